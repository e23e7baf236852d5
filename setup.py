"""Package build. The metadata is in setup.cfg; only the PyPI long description is made here."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# <img src="docs/images/..."> and [text](docs/...) resolve on the repository's own page
# but not on PyPI, which shows the long description without the repository's files
_IMAGE_TAG = re.compile(r"<img\b[^>]*>")
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\((?![a-z]+://)[^)]*\)")
_FIGURES_SECTION = re.compile(r"^## Figures\n.*?(?=^## |\Z)", re.S | re.M)
_RELATIVE_LINK = re.compile(r"\[([^\]]+)\]\((?![a-z]+://|#)([^)]+)\)")


def long_description(readme: str = os.path.join(HERE, "README.md")) -> str:
    """README.md for PyPI: without the repository's images (and the "Figures" section
    that captions them); relative links become their text plus the path."""
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    # the section that only captions the images goes with them
    text = _FIGURES_SECTION.sub("", text)
    text = _IMAGE_TAG.sub("", text)
    text = _MARKDOWN_IMAGE.sub("", text)
    return _RELATIVE_LINK.sub(r"\1 (`\2` in the repository)", text)


if __name__ == "__main__":
    setup(long_description=long_description(), long_description_content_type="text/markdown")
