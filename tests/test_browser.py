"""The notebook in a real browser: JupyterLab on 127.0.0.1 driven by Debian's chromium through playwright.

It runs every cell, moves a multiplier slider and types a value, watches the histogram and totals change,
clicks Save, then trains the tiny model and, while it trains, types another multiplier and watches the next
epoch's actual counts and histogram follow. EDTOOLS_SCREENSHOTS=1 also writes docs/balance_panel.png and
docs/training_panel.png. A second test kills the kernel mid-epoch, runs the cells again, accepts the offered
resume and finds the weights of an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "edtools.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_LIMIT = 300_000  # bytes per committed PNG

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sandbox_env(base: Path, **extra: str) -> dict[str, str]:
    """The server's environment: every Jupyter/IPython/matplotlib/HF folder in `base`, HOME untouched."""
    env = dict(os.environ)
    for name in (
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_DATA_DIR",
        "JUPYTER_RUNTIME_DIR",
        "IPYTHONDIR",
        "MPLCONFIGDIR",
    ):
        env[name] = str(base / name.lower())
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    env["HF_HOME"] = str(base / "hf")
    env["XDG_CACHE_HOME"] = str(base / "cache")
    env["npm_config_cache"] = str(base / "npm")  # JupyterLab asks npm for its prefix; npm logs there
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    kernel = Path(env["JUPYTER_DATA_DIR"]) / "kernels" / "python3"
    kernel.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (edtools)",
        "language": "python",
    }
    (kernel / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    # no "get Jupyter news?" prompt over the cells
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
    labconfig.mkdir()
    disabled = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
    (labconfig / "page_config.json").write_text(json.dumps(disabled), encoding="utf-8")
    env.update(extra)
    return env


def start_jupyterlab(root: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port, token = free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.news_url=",
    ]
    server = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as reply:
                if reply.status == 200:
                    return server, f"{url}/lab/tree/edtools.ipynb?token={token}"
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"JupyterLab did not start; its log:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def save_screenshot(locator, name: str) -> Path:
    """An element's screenshot in docs/, reduced to a palette PNG so it stays small."""
    from PIL import Image

    image = Image.open(io.BytesIO(locator.screenshot())).convert("RGB")
    out = REPO / "docs" / name
    out.parent.mkdir(exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    assert out.stat().st_size < SCREENSHOT_LIMIT, f"{out} is {out.stat().st_size} bytes"
    return out


def wait_for(predicate, timeout: float, what: str, state=None):
    """Poll predicate until true; on timeout fail with `what` and what state() says about the page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f"; {state()}" if state else ""))


@contextmanager
def notebook_page(tmp_path: Path, screenshots: bool = False):
    """JupyterLab serving a copy of the notebook (demo data root, EDTOOLS_SMOKE=ui: the training panel is set
    for the tiny model, a test presses Train) and a chromium page; yields (page, url, data root, server). A
    failure leaves a screenshot of the whole page in tmp_path."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (make browser-deps)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is missing: pip install playwright (no browser download is needed)")
    from edtools.demo import make_demo_dataset

    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "edtools.ipynb")
    data_root = make_demo_dataset(tmp_path / "data")
    # one torch thread per kernel: a kernel of two threads beside chromium (or a second run) on two cores
    # spends most of its time waiting on its own threads (a 12 s run took 109 s)
    env = sandbox_env(
        tmp_path / "jupyter", EDTOOLS_DATA_ROOT=str(data_root), EDTOOLS_SMOKE="ui", OMP_NUM_THREADS="1"
    )
    server, url = start_jupyterlab(root, env, tmp_path / "jupyterlab.log")
    try:
        with sync_playwright() as playwright:
            # chromium keeps crash-report settings under $XDG_CONFIG_HOME whatever --user-data-dir says
            browser_env = {**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                env=browser_env,
                headless=True,
                viewport={"width": 1700, "height": 1800} if screenshots else {"width": 1400, "height": 1000},
            )
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                try:
                    yield page, url, data_root, server
                except BaseException:
                    page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                    print(f"the page at the failure: {tmp_path / 'failure.png'}")
                    raise
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_balance_panel_in_jupyterlab(tmp_path):
    screenshots = os.environ.get("EDTOOLS_SCREENSHOTS") == "1"
    started = time.perf_counter()
    with notebook_page(tmp_path, screenshots) as (page, url, data_root, _):
        run_notebook_and_balance(page, url, data_root, screenshots, timeout_s=120)
        train_and_rebalance(page, screenshots, timeout_s=300)
    print(f"browser test took {time.perf_counter() - started:.1f} s")


def run_all_cells(page, timeout_s: float) -> None:
    """Run > Run All Cells, then wait until every code cell shows its number and none failed."""
    wait_for(
        lambda: "Idle" in page.locator(".jp-StatusBar-TextItem", has_text="|").first.inner_text(),
        60,
        "kernel",
    )
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_text("Run All Cells", exact=True).click()
    page.locator(".edtools-total").wait_for(timeout=timeout_s * 1000)
    # every code cell ran to the end: each prompt shows its number, none still [*]
    n_code = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    n_code = sum(cell["cell_type"] == "code" for cell in n_code)
    prompts = page.locator(".jp-InputPrompt")

    def all_ran() -> bool:
        return sum(bool(re.fullmatch(r"\[\d+\]:", p.strip())) for p in prompts.all_inner_texts()) == n_code

    wait_for(all_ran, timeout_s, "every cell to finish", lambda: prompts.all_inner_texts())
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, errors.first.inner_text()


def run_notebook_and_balance(page, url: str, data_root: Path, screenshots: bool, timeout_s: float) -> None:
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    run_all_cells(page, timeout_s)

    balance = page.locator(".edtools-balance")
    total = balance.locator(".edtools-total")
    histogram = balance.locator(".edtools-histogram")
    first_total = total.inner_text()
    assert first_total.startswith("Total: 96 images/epoch, ")  # showing the panel changed no value
    first_picture = histogram.screenshot()
    row = balance.locator(".edtools-row", has_text="people/alice")

    # keyboard on the slider handle: two steps to the right multiply by 10**0.02
    handle = row.locator(".edtools-multiplier-slider .noUi-handle")
    row.scroll_into_view_if_needed()
    handle.focus()
    handle.press("ArrowRight")
    handle.press("ArrowRight")
    box = row.locator(".edtools-multiplier-box input")
    stepped = float(f"{10**0.02:.3g}")  # drags and key steps are rounded to 3 significant digits
    wait_for(
        lambda: box.input_value() and float(box.input_value()) == stepped,
        20,
        "the box to follow the slider",
        lambda: (
            f"box {box.input_value()!r}, {total.inner_text()!r}, "
            f"handle {handle.get_attribute('aria-valuenow')}"
        ),
    )
    wait_for(lambda: total.inner_text() != first_total, 20, "the totals label to change")

    # typing a number: 24 images x 2.5 = 60 instead of 24, so the epoch grows by 36 images
    box.fill("2.5")
    box.press("Enter")
    wait_for(lambda: total.inner_text().startswith("Total: 132 images/epoch"), 20, "totals after typing 2.5")
    wait_for(lambda: histogram.screenshot() != first_picture, 20, "the histogram to change")
    if screenshots:
        save_screenshot(balance, "balance_panel.png")

    balance.get_by_role("button", name="Save").click()
    multiply = data_root / "people" / "alice" / "multiply.txt"
    wait_for(multiply.is_file, 20, f"{multiply} to be written")
    assert float(multiply.read_text()) == 2.5
    status = balance.locator(".edtools-status")
    wait_for(lambda: "Saved 1 file(s)" in status.inner_text(), 20, "the Save report")
    assert "people/alice/multiply.txt = 2.5" in status.inner_text()


def train_and_rebalance(page, screenshots: bool, timeout_s: float) -> None:
    """Train the tiny model from the panel; after the first epoch, type people/bob's multiplier 1 instead of 4
    in the balance panel: a later epoch trains bob's 5 images once instead of 4 times (1 of 6 held out)."""
    balance = page.locator(".edtools-balance")
    training = page.locator(".edtools-training")
    training.scroll_into_view_if_needed()
    epochs = training.locator(".edtools-epochs input")
    epochs.fill("6")
    epochs.press("Enter")
    training.get_by_role("button", name="Train").click()
    counts = training.locator(".edtools-epoch-counts")
    status = training.locator(".edtools-train-status")
    wait_for(
        lambda: "epoch 0 trained" in counts.inner_text(), timeout_s, "the first epoch", status.inner_text
    )
    assert re.search(r"people/bob 20\b", counts.inner_text()), counts.inner_text()
    for name in ("edtools-gap-chart", "edtools-bleed-heatmap"):  # drawn from the validations so far
        chart = training.locator(f".{name}")
        chart.wait_for(state="visible", timeout=timeout_s * 1000)
        assert chart.bounding_box()["height"] > 50, name
    actual = training.locator(".edtools-actual-histogram")
    before = actual.screenshot()
    box = balance.locator(".edtools-row", has_text="people/bob").locator(".edtools-multiplier-box input")
    box.scroll_into_view_if_needed()
    box.fill("1")
    box.press("Enter")
    wait_for(
        lambda: re.search(r"epoch [1-5] trained: .*people/bob 5\b", counts.inner_text()),
        timeout_s,
        "a later epoch to train people/bob at the new multiplier",
        counts.inner_text,
    )
    training.scroll_into_view_if_needed()
    wait_for(lambda: actual.screenshot() != before, 20, "the actual histogram to change")
    assert "<b>1</b>" in training.locator(".edtools-multiplier-history").inner_html()
    if screenshots:
        wait_for(lambda: "Done:" in status.inner_text(), timeout_s, "the run to finish", status.inner_text)
        save_screenshot(training, "training_panel.png")
    else:
        training.get_by_role("button", name="Stop").click()
        wait_for(
            lambda: "Stopped cleanly" in status.inner_text() or "Done:" in status.inner_text(),
            timeout_s,
            "the run to stop",
            status.inner_text,
        )


def kernel_pids(server: subprocess.Popen) -> list[int]:
    """The kernels the server started: its child processes running ipykernel."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == server.pid and b"ipykernel" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def mid_epoch_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint saved in the middle of the first epoch, if there is one yet."""
    for state in sorted((out / "checkpoints").glob("step-*/resume/state.json"), reverse=True):
        try:
            info = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written
        if info["epoch"] == 0 and info["batch"] > 0 and info["global_step"] >= 3:
            return state.parents[1]
    return None


def safetensors_of(checkpoint: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    return {
        f"{file.relative_to(checkpoint)}:{name}": tensor
        for file in sorted(checkpoint.rglob("*.safetensors"))
        for name, tensor in load_file(file).items()
    }


def test_a_run_killed_mid_epoch_resumes_after_the_cells_run_again(tmp_path):
    """Train from the panel with a checkpoint every ~1 s; SIGKILL the kernel in the middle of the first epoch
    (no clean save); JupyterLab restarts it; run every cell again: the panel offers the run from its newest
    checkpoint with "resume it" chosen; Train finishes it with the same weights as the same config run
    uninterrupted by the command line."""
    import torch

    started = time.perf_counter()
    with notebook_page(tmp_path) as (page, url, _, server):
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector(".jp-Notebook .jp-Cell")
        run_all_cells(page, 120)
        training = page.locator(".edtools-training")
        status = training.locator(".edtools-train-status")
        training.scroll_into_view_if_needed()
        minutes = training.locator(".edtools-checkpoint-minutes input")
        minutes.fill("0.02")
        minutes.press("Enter")
        training.get_by_role("button", name="Train").click()
        out = tmp_path / "notebooks" / "edtools_demo" / "run"
        checkpoint = wait_for(
            lambda: mid_epoch_checkpoint(out), 300, "a mid-epoch checkpoint", status.inner_text
        )
        [kernel] = kernel_pids(server)
        os.kill(kernel, signal.SIGKILL)  # a runtime that goes away: nothing is saved on the way out
        wait_for(
            lambda: not Path(f"/proc/{kernel}").exists() or kernel not in kernel_pids(server), 20, "the kill"
        )
        killed_at = time.perf_counter()

        # the same settings, uninterrupted, from the command line (meanwhile: the CPU is free of the kernel)
        config = json.loads((checkpoint / "resume" / "config.json").read_text(encoding="utf-8"))
        reference = tmp_path / "reference"
        config.update(out=str(reference), resume=False, overwrite=False, checkpoint_every_minutes=0.0)
        (tmp_path / "reference.json").write_text(json.dumps(config), encoding="utf-8")
        headless = subprocess.Popen(
            [sys.executable, "-m", "edtools", "train", "--config", str(tmp_path / "reference.json")],
            cwd=tmp_path / "notebooks",  # the tiny model's path is relative to the notebook
            stdout=(tmp_path / "reference.log").open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},  # as the kernel: the same sums, bit for bit
        )
        try:
            # JupyterLab says the kernel died and restarts it; then every cell runs again
            from playwright.sync_api import TimeoutError as NoDialog

            dialog = page.locator(".jp-Dialog")
            try:
                dialog.wait_for(timeout=20_000)
                dialog.locator(".jp-mod-accept").click()
            except NoDialog:  # the restart is shown in the status bar only
                pass
            wait_for(lambda: kernel_pids(server), 60, "the restarted kernel")
            # from the top, as a person would: JupyterLab only draws the prompts of cells it shows
            page.locator(".jp-Notebook .jp-Cell").first.scroll_into_view_if_needed()
            run_all_cells(page, 120)
            wait_for(lambda: "Found a run in" in status.inner_text(), 60, "the offer", status.inner_text)
            offer = status.inner_text()
            assert (
                re.search(r"stopped at step \d+, in epoch 1 of 2", offer) and "Train resumes it" in offer
            ), offer
            assert training.locator(".edtools-earlier-run select").input_value() == "resume it"
            training.get_by_role("button", name="Train").click()
            wait_for(
                lambda: "Done:" in status.inner_text(), 400, "the resumed run to finish", status.inner_text
            )
            assert "resuming from" in training.inner_text()
            resumed_s = time.perf_counter() - killed_at
            assert headless.wait(400) == 0, (tmp_path / "reference.log").read_text(errors="replace")[-3000:]
        finally:
            if headless.poll() is None:
                headless.kill()
    [final] = sorted((out / "checkpoints").glob("step-*[0-9]"))[-1:]
    [expected] = sorted((reference / "checkpoints").glob("step-*[0-9]"))[-1:]
    assert final.name == expected.name  # the same number of steps
    ours, theirs = safetensors_of(final), safetensors_of(expected)
    assert ours.keys() == theirs.keys() and ours
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    print(
        f"kill-and-resume browser test took {time.perf_counter() - started:.1f} s "
        f"({resumed_s:.1f} s from the kill to the resumed run's end)"
    )
