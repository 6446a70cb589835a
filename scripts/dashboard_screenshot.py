"""Refreshes docs/img/dashboard.png: runs the dashboard's browser test (two tiny nodes, a relay, a hostile publisher,
headless Chromium) with SWARM_NODE_SCREENSHOT pointing there. Usage: .venv/bin/python scripts/dashboard_screenshot.py [OUT]
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "img" / "dashboard.png").resolve()
    env = {**os.environ, "SWARM_NODE_SCREENSHOT": str(out), "SWARM_NODE_REQUIRE_BROWSER": "1",
           "SWARM_NODE_SCREENSHOT_ROUNDS": os.environ.get("SWARM_NODE_SCREENSHOT_ROUNDS", "30")}  # curves worth a look
    test = "tests/test_dashboard.py::test_node_dashboard_draws_its_rounds_peers_and_rejections_live"
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env)
    if rc == 0:
        print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
