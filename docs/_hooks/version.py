"""MkDocs hook: show the installed distsparse version in the site name and where a page writes ``{{ version }}``."""

from importlib.metadata import version


def on_config(config, **kwargs):
    config["site_name"] = f"distsparse {version('distsparse')}"
    return config


def on_page_markdown(markdown, **kwargs):
    return markdown.replace("{{ version }}", version("distsparse"))
