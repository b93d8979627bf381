"""MkDocs hook: publish results/ (beside docs/) in the site, so a page's link ``../results/FILE`` (the path that
works when the Markdown is read in the repository) resolves in the built site too, and a broken one still fails
``mkdocs build --strict``."""

from __future__ import annotations

import os
import posixpath
import re

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")
_LINK = re.compile(r"\]\(((?:\.\./)+results/[^)\s#]+)")


def on_files(files, config):
    for base, _, names in os.walk(RESULTS):
        for name in names:
            if name.endswith(".md"):  # results/README.md is the repository's index, not a page of the site
                continue
            path = os.path.join(base, name)
            uri = "_results/" + os.path.relpath(path, RESULTS).replace(os.sep, "/")
            files.append(File.generated(config, uri, abs_src_path=path))
    return files


def on_page_markdown(markdown, page, config, files):
    """``](../results/x.png)`` from a page: rewritten to the published copy when it points into results/."""
    page_dir = os.path.dirname(page.file.abs_src_path)

    def repl(m):
        target = os.path.normpath(os.path.join(page_dir, m.group(1)))
        if os.path.commonpath([target, RESULTS]) != RESULTS:
            return m.group(0)  # not ours: MkDocs judges it
        uri = "_results/" + os.path.relpath(target, RESULTS).replace(os.sep, "/")
        return "](" + posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")

    return _LINK.sub(repl, markdown)
