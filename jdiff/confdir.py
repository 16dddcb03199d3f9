"""Where jdiff's config tree is: ``jdiff/conf/`` in an installed wheel (setup.py ships the checkout's ``conf/`` as
the package ``jdiff.conf``), or ``conf/`` beside the package in a source checkout and an editable install.

An absolute folder rather than Hydra's ``pkg://jdiff.conf``: with several checkouts on one interpreter (one installed
editable, another put first by PYTHONPATH), importing ``jdiff.conf`` could reach the installed checkout's tree while
the code runs from the other; the folder next to the running code is always the matching one.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "conf"
CHECKOUT = Path(__file__).resolve().parents[1] / "conf"
CONF_DIR = PACKAGED if (PACKAGED / "config.yaml").is_file() else CHECKOUT
