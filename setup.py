"""Packaging: the metadata lives in setup.cfg; only the long description (PyPI's page) is made here."""

import pathlib
import re

from setuptools import setup


def long_description() -> str:
    """README.md without what renders only inside the repository: its images and relative links.

    PyPI shows the long description away from the repository's files, where ``docs/...png`` and
    ``README_cn.md`` do not resolve; the links keep their text.
    """
    text = (pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^!\[[^\]]*\]\([^)]*\)\n\n?", "", text, flags=re.M)
    return re.sub(r"\[([^\]]+)\]\((?!https?:|#)[^)]*\)", r"\1", text)


setup(long_description=long_description(), long_description_content_type="text/markdown")
