"""The Edge AI Tuning Kit matrix estimate (tunesmith.plan.matrix) and the published shapes it stands on
(tunesmith.plan.reference_models): meta-device models only, no weights, no network."""

from __future__ import annotations

import re

import pytest

from tunesmith import api
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.plan.matrix import KIT_GPUS, KIT_LORA, KIT_QLORA, cell_estimate, estimate_matrix, kit_cells
from tunesmith.plan.reference_models import REFERENCE_MODELS, reference_shape, short_name, write_config_json
from tunesmith.plan.shapes import shape_from_folder


@pytest.fixture(scope="module")
def kit():
    return estimate_matrix()


@pytest.mark.parametrize("name", list(REFERENCE_MODELS))
def test_each_reference_model_has_its_published_size(name):
    published = REFERENCE_MODELS[name].published_billions * 1e9
    counted = reference_shape(name).total_params
    assert abs(counted - published) <= 0.01 * published, f"{name}: {counted:,} parameters, published {published:,.0f}"


def test_untied_output_layers_count_once_more():
    """DeepSeek-R1-Distill-Qwen-1.5B is Qwen2.5-1.5B's shape with its output layer untied: 151936 x 1536 more."""
    tied, untied = reference_shape("Qwen2.5-1.5B-Instruct"), reference_shape("DeepSeek-R1-Distill-Qwen-1.5B")
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert untied.total_params - tied.total_params == 151936 * 1536


def test_a_written_config_json_reads_back_as_the_same_shape(tmp_path):
    write_config_json("Llama-3.2-1B-Instruct", tmp_path / "llama")
    read = shape_from_folder(tmp_path / "llama")
    expected = reference_shape("Llama-3.2-1B-Instruct")
    assert (read.total_params, read.tied_embeddings, read.kv_heads, read.head_dim) == (
        expected.total_params, expected.tied_embeddings, expected.kv_heads, expected.head_dim)


def test_the_matrix_has_one_cell_per_kit_cell(kit):
    published = {(m, meth, g, mode): ok for m, meth, g, mode, ok in kit_cells()}
    assert len(published) == 4 * len(KIT_LORA) + 2 * len(KIT_QLORA) == 46
    estimated = {(c.model, c.method, c.gpu, c.mode): c.published for c in kit.cells}
    assert estimated == published
    assert len(kit.compared) == 46 and 0 <= kit.agree <= 46


def test_the_printed_agreement_count_is_the_functions(kit, capsys):
    assert main(["estimate", "--matrix"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"(\d+) of (\d+) cells agree", out)
    assert found, out[-2000:]
    assert (int(found.group(1)), int(found.group(2))) == (kit.agree, len(kit.compared))
    for model in list(KIT_LORA) + list(KIT_QLORA):
        assert short_name(model) in out
    assert "A770" in out and "B580" in out and "here" in out


def test_the_json_matrix_is_the_functions(kit, capsys):
    import json

    assert main(["estimate", "--matrix", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["agree"], data["compared"], len(data["cells"])) == (kit.agree, 46, 46)


def test_qlora_needs_less_than_lora_for_every_model(kit):
    a = kit.assumptions
    for model in dict.fromkeys(list(KIT_LORA) + list(KIT_QLORA)):
        for profile in ("kit", "tunesmith"):
            b = type(a)(seq_len=a.seq_len, rank=a.rank, profile=profile, checkpointing=True)
            lora = cell_estimate(model, "lora", "A770", "single", b)
            qlora = cell_estimate(model, "qlora", "A770", "single", b)
            assert qlora.peak_bytes < lora.peak_bytes, (model, profile, qlora.peak_bytes, lora.peak_bytes)


def test_the_b580_never_fits_a_cell_the_a770_does_not(kit):
    for c in kit.cells:
        if c.gpu == "B580" and c.fits:
            assert kit.cell(c.model, c.method, "A770", c.mode).fits, c
    assert KIT_GPUS["B580"].memory_bytes < KIT_GPUS["A770"].memory_bytes


def test_longer_rows_never_need_less(kit):
    longer = estimate_matrix(seq_len=2 * kit.assumptions.seq_len)
    for short in kit.cells:
        assert longer.cell(short.model, short.method, short.gpu, short.mode).peak_bytes > short.peak_bytes


def test_identically_shaped_models_the_kit_answers_differently_are_named(kit):
    pairs = {frozenset((short_name(c.model), short_name(d.model))) for c, d in kit.same_shape_conflicts()}
    assert frozenset(("Qwen2.5-7B-Instruct", "DeepSeek-R1-Distill-Qwen-7B")) in pairs


def test_impossible_assumptions_are_sentences(capsys):
    with pytest.raises(UserError, match="sequence length"):
        estimate_matrix(seq_len=0)
    with pytest.raises(UserError, match="two cards"):
        api.estimate_matrix(multi_gpus=1)
    assert main(["estimate", "--matrix", "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "rank" in err and "Traceback" not in err


def test_models_prints_the_estimated_matrix_beside_the_validated_one(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "validated matrix" in out and "estimated matrix" in out
    assert re.search(r"\d+ of 46 cells agree", out)
    assert "A770" in out and "B580" in out and "here" in out
