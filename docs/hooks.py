"""MkDocs hooks: the site's home page is the README (one text, read on GitHub and on the site), its
links into docs/ made relative to the site."""

from pathlib import Path


def on_page_read_source(page, config) -> str | None:
    if page.file.src_uri != "index.md":
        return None
    readme = Path(config.config_file_path).parent / "README.md"
    return readme.read_text().replace("](docs/", "](")
