"""`vlpt report`: runs side by side in one HTML page. `runs` reads run folders, `ablation` builds the papers'
tables from them, `page` draws the curves and writes the page."""
from __future__ import annotations

from vlpt.report.page import write_report  # noqa: F401
