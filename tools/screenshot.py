"""A screenshot of the explorer page (`make screenshot`): starts `ebr explore` over a bundle of a
workspace, opens /explore?user=ID in headless Debian Chromium (the browser the tests use) and saves
a PNG of the whole page.

    python tools/screenshot.py [--workspace ./workspace] [--bundle latest] [--user ID]
                               [--mode single|multi|conditional|auto] [--out docs/explore.png]

Without --user: the first user with at least 12 history items. The bundle is any the workspace
has (`latest` by default: run `make demo` first).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default="./workspace")
    ap.add_argument("--bundle", default="latest")
    ap.add_argument("--user", default=None)
    ap.add_argument("--mode", default="auto", choices=["single", "multi", "conditional", "auto"],
                    help="the page's mode (conditional: the user's followed interests as conditions)")
    ap.add_argument("--out", default="docs/explore.png")
    a = ap.parse_args()
    from selenium import webdriver

    from ebr.serve.retriever import Retriever
    from ebr.workspace import Workspace

    bundle = Workspace.at(a.workspace).resolve_bundle(a.bundle)
    user = a.user
    if user is None:
        r = Retriever(bundle)
        user = next(u for u in r.fs.users.ids if int((r.hist[int(r.user_codes([u])[0])] > 0).sum()) >= 12)
        del r
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ebr.cli", "explore", str(bundle), "--workspace", a.workspace,
                               "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        with tempfile.TemporaryDirectory() as profile:
            for arg in ("--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                        "--disable-gpu", "--window-size=1400,1000", f"--user-data-dir={profile}"):
                opts.add_argument(arg)
            d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
            try:
                d.get(f"{url}/explore?user={user}")
                from selenium.webdriver.support.ui import Select, WebDriverWait

                WebDriverWait(d, 60).until(lambda x: x.execute_script("return document.body.dataset.loaded"))
                Select(d.find_element("id", "mode")).select_by_value(a.mode)
                WebDriverWait(d, 60).until(lambda x: x.execute_script("return document.body.dataset.loaded"))
                height = d.execute_script("return document.body.scrollHeight")
                d.set_window_size(1400, min(int(height) + 40, 4000))
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                d.save_screenshot(a.out)
            finally:
                d.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(f"{a.out}: user {user}, bundle {Path(bundle).name}, mode {a.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
