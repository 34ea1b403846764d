"""`attnlab inspect` end to end on MiniLM: HTML + JSON written, the HTML works offline, and in headless
Chromium its heatmaps, tables and head selection work."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnlab.cli import main
from attnlab.inspect import report as R
from browser import open_html  # tests/browser.py (tests/ is on sys.path through tests/conftest.py)

TEXT = ("The cat sat on the mat. It was warm there, so the cat slept for hours. "
        "Later a dog came in and barked at it! The cat ran away.")


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, minilm):  # minilm: skips with the reason when the models extra is missing
    from attnlab.inspect.models import minilm_path

    out = tmp_path_factory.mktemp("inspect")
    rc = main(["inspect", str(minilm_path()), "--text", TEXT, "--out", str(out), "--quiet"])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_writes_html_and_json_with_every_metric(inspected, minilm):
    out, data = inspected
    assert (out / "report.html").stat().st_size > 10_000
    assert data["model"]["layers"] == 6 and data["model"]["heads"] == 12 and not data["model"]["causal"]
    assert data["layers"] == list(range(6)) and data["heads"] == list(range(12))
    names = {m["name"] for m in data["metrics"]}
    assert {"entropy", "prev_token", "self_token", "next_token", "distance", "special", "punctuation", "sink0",
            "received_max", "waad", "importance", "importance_raw"} <= names
    for m in data["metrics"]:
        assert np.array(m["values"], dtype=float).shape == (6, 12), m["name"]
    n = data["input"]["n_tokens"]
    assert len(data["position_metrics"]["received"][0][0]) == n
    assert data["retrieval"]["skipped"] and data["streaming"]["skipped"]  # an encoder
    p = data["pruning"]
    assert p["fractions"][0] == 0 and len(p["importance"]) == len(p["random"]) == len(p["fractions"])
    assert data["sinks"]["rows"] and 0 <= data["sinks"]["rate"] <= 1

    # the matrix window against the model's own attention weights (eager attention, no attnlab hooks)
    model, tok = minilm
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == n < 64
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[:, 0]  # (L, H, n, n)
    finally:
        model.set_attn_implementation(impl)
    mx = R.decode_matrices(data["matrices"])
    assert mx.shape == (6, 12, n, n + 1) and data["matrices"]["tokens"] == data["input"]["tokens"]
    np.testing.assert_allclose(mx[..., :n], att.numpy(), atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(mx[..., n], 0, atol=0.5 / 255)  # the whole text fits the window


def test_html_has_no_url(inspected):
    html = (inspected[0] / "report.html").read_text()
    assert not re.search(r"(?i)https?:", html)
    assert not re.search(r"(?i)<(link|img|iframe|object|embed)\b", html)
    assert not re.search(r"""(?i)\b(src|href)\s*=""", html)
    assert html.count("<script") == 2 and "</script>" in html


def test_report_in_headless_chromium(inspected):
    out, data = inspected
    with open_html(out / "report.html") as view:
        page = view.page
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator(".heatmap").count() == len(data["metrics"])
        assert page.locator("#heatmap-entropy rect.cell").count() == 72
        assert page.locator("#sinks-table tbody tr").count() == len(data["sinks"]["rows"])
        assert page.locator("#pruning-chart polyline").count() == 2
        assert "skipped" in page.locator("#retrieval").inner_text()

        # click layer 2, head 5 of the entropy heatmap: the matrix shows that head
        page.click("#heatmap-entropy rect.cell[data-layer='2'][data-head='5']")
        assert page.locator("#matrix-title").inner_text() == "layer 2 \u00b7 head 5"
        svg = page.locator("#matrix svg.mx")
        assert (svg.get_attribute("data-layer"), svg.get_attribute("data-head")) == ("2", "5")
        n = data["matrices"]["size"]
        assert page.locator("#matrix rect.mcell").count() == n * (n + 1)
        assert page.locator("rect.cell.selected").count() == len(data["metrics"])  # same head in every heatmap
        mx = R.decode_matrices(data["matrices"])
        titles = page.eval_on_selector_all("#matrix rect.mcell title", "els => els.map(e => e.textContent)")
        shown = [float(t.rsplit(": ", 1)[1]) for t in titles[:n + 1]]  # row 0
        np.testing.assert_allclose(shown, mx[2, 5, 0], atol=6e-4)

        # the selects drive the same view
        page.select_option("#sel-layer", "4")
        assert page.locator("#matrix-title").inner_text() == "layer 4 \u00b7 head 5"
        assert page.locator("#heatmap-entropy rect.cell.selected").get_attribute("data-layer") == "4"
        assert not view.errors and not view.blocked


def test_script_data_is_escaped():
    data = {"title": "t</script><script>alert(1)</script>", "input": {"tokens": ["https://x.y/</script>", "<!--"]},
            "metrics": []}
    html = R.render_html(data)
    assert html.count("</script>") == 2 and "<!--" not in html and not re.search(r"(?i)https?:", html.replace(
        "https:\\/\\/", ""))
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(raw)["input"]["tokens"] == data["input"]["tokens"]
    assert R.plain({"a": float("nan"), "b": np.float32(2.5), "c": torch.tensor([1.0, float("inf")])}) == \
        {"a": None, "b": 2.5, "c": [1.0, None]}
    w = np.random.default_rng(0).random((2, 3, 4, 5))
    np.testing.assert_allclose(R.decode_matrices(R.encode_matrices(w, 7)), w, atol=0.5 / 255 + 1e-9)


def test_user_errors_name_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["inspect", str(missing), "--text", "hi"]) == 2
    assert str(missing) in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["inspect", str(tmp_path / "notes.txt"), "--text", "hi"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--file", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path), "--text", "hi", "--layers", "3-1"]) == 2
    assert "--layers" in capsys.readouterr().err


def test_other_commands_do_not_import_inspect():
    code = ("import sys; from attnlab.cli import main; main(['list', '--json']); "
            "print('attnlab.inspect' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
