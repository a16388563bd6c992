"""The studio in a real browser (Debian's chromium, headless, driven by Playwright): the workflow a new user
clicks through, from a project to a downloaded GGUF file, with a screenshot of each page under
test-artifacts/screenshots/ (kept out of the repository).  Every request the pages make stays on this machine
(the `page` fixture fails the test otherwise), so nothing comes from a CDN.

The model is a small random Llama built here, a little bigger than the other tests' tiny one, so that a run
lasts long enough to be watched, refreshed and stopped part-way."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import REPEAT_ROWS, build_tiny_tokenizer
from studio_fixtures import StudioProcess, screenshot

pytestmark = pytest.mark.slow
STEPS = 400


def slow_tiny_model(root: Path) -> Path:
    """A 4-layer, 256-wide random Llama (seed 0) with the tiny tokenizer: a few hundredths of a second a step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=768, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    folder = root / "browser-llama"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def arrived(page, url_pattern: str, timeout: float = 60) -> None:
    """Wait for the page to move on to `url_pattern`; if it shows a notice instead, fail with its sentence."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(url_pattern, page.url):
            page.wait_for_load_state()
            return
        notice = page.locator("#notice")
        if notice.count() and notice.is_visible() and notice.inner_text().strip():
            raise AssertionError(f"the page said: {notice.inner_text()}")
        time.sleep(0.1)
    raise AssertionError(f"still at {page.url}, not {url_pattern}")


def points(page, canvas: str) -> int:
    return int(page.locator(canvas).get_attribute("data-points") or 0)


def wait_points(page, canvas: str, at_least: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = points(page, canvas)
        if n >= at_least:
            return n
        time.sleep(0.2)
    raise AssertionError(f"{canvas} has {points(page, canvas)} points, not {at_least}")


def test_the_whole_workflow_in_a_browser(tmp_path, page):
    model = slow_tiny_model(tmp_path)
    with StudioProcess(tmp_path / "studio") as studio:
        # --- a project
        page.goto(studio.url)
        screenshot(page, "01-projects-empty")
        form = page.locator("#new-project")
        form.locator("[name=name]").fill("Repeat words")
        form.locator("[name=base_model]").fill(str(model))
        form.locator("[name=system_prompt]").fill("You repeat words.")
        form.locator("button[type=submit]").click()
        arrived(page, r"/projects/\d+$")
        assert "Repeat words" in page.locator("h1").inner_text()
        screenshot(page, "02-project")

        # --- a dataset with one broken row: its number and field are shown, and it is fixed in the page
        rows = [{**r, "instruction": r["instruction"].replace("Repeat", verb)}
                for verb in ("Repeat", "Say again", "Echo") for r in REPEAT_ROWS]
        broken = 5
        data = tmp_path / "repeat.jsonl"
        data.write_text("".join(json.dumps({k: v for k, v in r.items() if not (n == broken and k == "output")}) + "\n"
                                for n, r in enumerate(rows, start=1)))
        page.locator("#upload-dataset input[name=file]").set_input_files(str(data))
        page.locator("#upload-dataset button[type=submit]").click()
        arrived(page, r"/datasets/\d+")
        problem = page.locator(f'#problems li[data-row="{broken}"][data-field="output"]')
        problem.wait_for()
        assert str(broken) in problem.inner_text()
        screenshot(page, "03-dataset-problem")
        editor = page.locator(f"#row-{broken} textarea.row-json")
        editor.fill(json.dumps(rows[broken - 1]))
        page.locator(f"#row-{broken} .save-row").click()
        page.locator("#no-problems").wait_for()
        assert page.locator("#problems li").count() == 0
        screenshot(page, "04-dataset-fixed")

        # --- the train form, on that dataset: every key with its default; method-specific sections follow the method
        page.locator("#train-on").click()
        arrived(page, r"/train")
        assert page.locator('fieldset[data-section="adalora"]').is_hidden()
        page.select_option('[name="method"]', "adalora")
        assert page.locator('fieldset[data-section="adalora"]').is_visible()
        page.select_option('[name="method"]', "lora")
        assert page.locator('[name="data.path"]').input_value().endswith(".jsonl")
        page.fill('[name="data.validation_split"]', "0.2")
        page.fill('[name="training.max_steps"]', str(STEPS))
        page.fill('[name="training.epochs"]', "100")
        page.fill('[name="training.num_threads"]', "1")
        page.fill('[name="training.learning_rate"]', "0.003")
        page.fill('[name="training.save_steps"]', "10")
        page.fill('[name="training.eval_steps"]', "20")
        page.select_option('[name="eval.enabled"]', "true")
        page.fill('[name="eval.limit"]', "4")
        page.fill('[name="eval.max_new_tokens"]', "8")
        # the YAML view holds what the form says, and what is typed there comes back to the form
        page.locator("#yaml-tab").click()
        page.locator("#yaml-view").wait_for(state="visible")
        yaml_text = page.locator("#yaml-text").input_value()
        assert f"max_steps: {STEPS}" in yaml_text and "save_steps: 10" in yaml_text
        page.locator("#yaml-text").fill(yaml_text.replace("learning_rate: 0.003", "learning_rate: 0.004"))
        page.get_by_text("Apply YAML to the form").click()
        page.locator("#form-view").wait_for(state="visible")
        assert page.locator('[name="training.learning_rate"]').input_value() == "0.004"
        screenshot(page, "05-train-form")
        page.locator("#launch").click()
        arrived(page, r"/runs/\d+$")
        run_url = page.url

        # --- watch: the loss chart gains points, and goes on after a refresh
        before = wait_points(page, "#chart-loss", 3)
        page.reload()
        after = wait_points(page, "#chart-loss", before)  # the points so far come back at once ...
        wait_points(page, "#chart-loss", after + 2)  # ... and new ones keep arriving
        screenshot(page, "06-run-training")

        # --- stop (a checkpoint is saved) and resume
        page.locator("#stop").click()
        page.wait_for_function("document.getElementById('run-state').textContent.includes('resumable')",
                               timeout=90_000)
        screenshot(page, "07-run-stopped")
        page.locator("#resume").click()
        page.wait_for_function("document.getElementById('run-state').textContent.startsWith('finished')",
                               timeout=180_000)
        page.goto(run_url)
        assert page.locator("#health").is_visible()
        wait_points(page, "#chart-loss", STEPS)
        screenshot(page, "08-run-finished")

        # --- evaluate: the base-vs-tuned table of the before/after evaluation
        scores = page.locator("#evaluate table.scores")
        assert scores.count() >= 1 and scores.first.locator("tr").count() > 2
        assert "exact_match" in scores.first.inner_text() or "chrf" in scores.first.inner_text()

        # --- export: a GGUF file, downloaded from the page
        page.locator("#export-gguf button[type=submit]").click()
        link = page.locator("#export-jobs a[download]", has_text=".gguf")
        link.first.wait_for(timeout=180_000)
        screenshot(page, "09-run-exported")
        with page.expect_download() as download:
            link.first.click()
        saved = tmp_path / "model.gguf"
        download.value.save_as(saved)
        assert saved.read_bytes()[:4] == b"GGUF" and saved.stat().st_size > 1_000_000

        # --- chat: base and tuned answer the same message side by side
        page.goto(run_url + "/chat")
        page.locator("#chat-input textarea").fill("Repeat the word river.")
        page.locator("#chat-input button[type=submit]").click()
        for side in ("base", "tuned"):
            answer = page.locator(f"#column-{side} .message.answer")
            answer.first.wait_for(timeout=120_000)
        # both streams end (a random model may well answer with nothing at all)
        page.wait_for_function("document.querySelectorAll('.message.answer').length >= 2 "
                               "&& !document.querySelector('.message.streaming')", timeout=120_000)
        screenshot(page, "10-chat")
        page.reload()  # the conversation is kept
        assert page.locator("#column-tuned .message.user").first.inner_text() == "Repeat the word river."
