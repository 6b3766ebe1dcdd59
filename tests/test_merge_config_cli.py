"""``merge_checkpoints.py --config``: the output folder mergekit users expect, resume, the rebuild command, and
errors before any tensor is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fill_model_paths, save_llama_family

MODELS = ("base", "ft0", "ft1")
TIES = """
    merge_method: dare_ties
    base_model: @base
    models:
      - model: @ft0
        parameters: {weight: 0.6, density: [0.3, 0.9]}
      - model: @ft1
        parameters: {weight: [{filter: mlp, value: 0.2}, {value: 0.4}], density: 0.5}
    dtype: float32
    out_dtype: bfloat16
    tokenizer_source: base
    """


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = save_llama_family(tmp_path_factory.mktemp("cli_family"), MODELS, num_hidden_layers=3)
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return root


def write_config(root: Path, tmp_path: Path, text: str = TIES) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(fill_model_paths(text, root, MODELS))
    return path


def merged(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_the_output_folder_has_mergekit_s_layout_and_rebuilds_the_same_bytes(family, tmp_path):
    import merge_checkpoints

    config = write_config(family, tmp_path)
    out = tmp_path / "merged"
    merge_checkpoints.main(["--config", str(config), "--output_dir", str(out), "--random-seed", "7",
                            "--max_shard_size", "40KB", "--quiet"])
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "mergekit_config.yml", "README.md",
            "merge_config.json", "tokenizer_config.json"} <= files
    assert (out / "mergekit_config.yml").read_text() == config.read_text()  # verbatim
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    tensors = merged(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())  # out_dtype
    model_config = json.loads((out / "config.json").read_text())
    assert model_config.get("dtype", model_config.get("torch_dtype")) == "bfloat16"
    card = (out / "README.md").read_text()
    assert "DARE TIES" in card and str(family / "ft1") in card and "density: [0.3, 0.9]" in card
    record = json.loads((out / "merge_config.json").read_text())
    assert record["random_seed"] == 7 and record["semantics"]["dare_rescale"] == "l1"
    command = record["command"]
    assert "--random-seed 7" in command and "mergekit_config.yml" in command
    # the recorded command, run from the output folder's copy of the YAML, gives the same bytes
    again = tmp_path / "again"
    merge_checkpoints.main([*command.replace("mergekit_config.yml", str(out / "mergekit_config.yml"))
                           .replace("OUT", str(again)).split()[2:], "--max_shard_size", "40KB", "--quiet"])
    theirs = merged(again)
    assert all(torch.equal(tensors[n], theirs[n]) for n in tensors)
    # another seed draws other masks; the paper's rescale is another merge, recorded
    other = merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "seed8"),
                                    "--random-seed", "8", "--quiet"])
    assert not all(torch.equal(tensors[n], merged(Path(other["output_dir"]))[n]) for n in tensors)
    merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "paper"), "--random-seed", "7",
                            "--dare_rescale", "inverse_keep", "--quiet"])
    paper = json.loads((tmp_path / "paper" / "merge_config.json").read_text())
    assert paper["semantics"]["dare_rescale"] == "inverse_keep" and "--dare_rescale inverse_keep" in paper["command"]


def test_resume_reuses_a_finished_merge_and_refuses_another(family, tmp_path):
    import merge_checkpoints

    config = write_config(family, tmp_path)
    out = tmp_path / "merged"
    merge_checkpoints.main(["--config", str(config), "--output_dir", str(out), "--quiet"])
    again = merge_checkpoints.main(["--config", str(config), "--output_dir", str(out), "--resume", "--quiet"])
    assert again.get("already_complete")
    with pytest.raises(FileExistsError, match="other settings"):
        merge_checkpoints.main(["--config", str(config), "--output_dir", str(out), "--resume", "--random-seed", "3",
                                "--quiet"])


@pytest.mark.parametrize("text, message", [
    (TIES.replace("density: 0.5", "densty: 0.5"), r"unknown parameter 'densty' .*did you mean: density"),
    (TIES.replace("dare_ties", "dare_tie"), r"did you mean: dare_ties"),
    ("merge_method: passthrough\nslices: [{sources: [{model: @ft0, layer_range: [0, 4]}]}]\n",
     r"layer_range \[0, 4\] of .* out of bounds: the model has 3 layers"),
    ("merge_method: task_arithmetic\nbase_model: @base\nmodels: [{model: @ft0}]\n",
     "missing required parameter 'weight'"),
    ("merge_method: della\nbase_model: @base\nmodels:\n  - model: @ft0\n    parameters:\n      weight: 1\n"
     "      density: [{filter: mlp, value: 0.95}, {value: 0.5}]\n",
     r"della needs 0 < density - epsilon and density \+ epsilon < 1, got density 0.95"),
])
def test_bad_configs_fail_before_any_tensor_is_read(family, tmp_path, monkeypatch, text, message):
    import merge_checkpoints
    from merge_engine import tensor_reader

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before the configuration was validated")

    monkeypatch.setattr(tensor_reader.TensorReader, "read", no_reads)
    config = write_config(family, tmp_path, text)
    with pytest.raises(ValueError, match=message):
        merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert not (tmp_path / "out").exists()


def test_config_refuses_the_flag_interface_and_dry_run_merges_nothing(family, tmp_path, capsys):
    import merge_checkpoints

    config = write_config(family, tmp_path)
    with pytest.raises(ValueError, match="--config holds the whole merge; got also --scaling_coefficient"):
        merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "x"),
                                "--scaling_coefficient", "0.5"])
    with pytest.raises(SystemExit):
        merge_checkpoints.main(["--output_dir", str(tmp_path / "x"), "--random-seed", "3",
                                "--pretrained_model", "a", "--finetuned_models", "b"])
    summary = merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "dry"), "--dry_run"])
    assert summary["dry_run"] and summary["tensors"] == 3 + 3 * 9
    assert not (tmp_path / "dry").exists()
    plan = json.loads(capsys.readouterr().out)
    assert plan["merge_method"] == "dare_ties" and plan["output_layers"] == 3


@pytest.mark.parametrize("method, extra", [("dare_ties", ""), ("dare_linear", ""), ("della", ", epsilon: 0.1"),
                                           ("task_arithmetic", ""), ("linear", ""), ("ties", ""),
                                           ("breadcrumbs", ", gamma: 0.05"), ("breadcrumbs_ties", ", gamma: 0.1")])
def test_big_tensors_merged_in_row_chunks_equal_the_whole_tensor_merge(family, tmp_path, monkeypatch, method,
                                                                       extra):
    """Row chunks draw the same masks (keyed by element position) and use the whole tensor's L1 norms: the same
    kept entries, values equal up to the rounding of the norms (summed chunk by chunk). TIES and breadcrumbs find
    each model's whole-tensor selection first: bit-identical."""
    from merge_engine import mergekit_merge

    base = "" if method == "linear" else "base_model: @base\n"
    density = "" if method in ("linear", "task_arithmetic") else ", density: 0.4"
    text = (f"merge_method: {method}\n{base}models:\n"
            f"  - {{model: @ft0, parameters: {{weight: 0.7{density}{extra}}}}}\n"
            f"  - {{model: @ft1, parameters: {{weight: 0.5{density}{extra}}}}}\ndtype: float32\n")
    config = write_config(family, tmp_path, text)
    whole = merge_checkpoints_main(config, tmp_path / "whole")
    monkeypatch.setattr(mergekit_merge, "CHUNK_MIN_ELEMENTS", 512)
    monkeypatch.setattr(mergekit_merge, "CHUNK_ELEMENTS", 100)  # 64-wide rows: chunks of 1 row
    chunked = merge_checkpoints_main(config, tmp_path / "chunked")
    planned = mergekit_merge.prepare_config(config.read_text(), tmp_path / "x")
    assert sum(mergekit_merge.row_chunks(t) is not None for t in planned.tensors) >= 2  # embeddings, LM head
    base = merged(family / "base")
    for name in whole:
        # the same entries kept (masks keyed by position), and the values equal up to the rounding of the L1 norms:
        # at most 4 ulps of the tensor's largest value (exact without an L1 rescale)
        assert torch.equal(whole[name] == base[name], chunked[name] == base[name]), name
        largest = whole[name].abs().max()
        ulp = (torch.nextafter(largest, torch.tensor(float("inf"))) - largest).item()
        bound = 4 * ulp if method.startswith(("dare", "della")) else 0
        assert (whole[name] - chunked[name]).abs().max().item() <= bound, name


def merge_checkpoints_main(config: Path, out: Path) -> dict[str, torch.Tensor]:
    import merge_checkpoints

    merge_checkpoints.main(["--config", str(config), "--output_dir", str(out), "--quiet"])
    return merged(out)


def test_tokenizer_source_names_the_donor_and_a_missing_one_fails_first(family, tmp_path, monkeypatch):
    import merge_checkpoints
    from merge_engine import tensor_reader

    (family / "ft1" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    config = write_config(family, tmp_path, TIES.replace("tokenizer_source: base", "tokenizer_source: @ft1"))
    merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "out"), "--quiet"])
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77
    monkeypatch.setattr(tensor_reader.TensorReader, "read", lambda *a, **k: pytest.fail("read before validation"))
    config = write_config(family, tmp_path, TIES.replace("tokenizer_source: base",
                                                         f"tokenizer_source: {tmp_path / 'nowhere'}"))
    with pytest.raises((ValueError, OSError), match="nowhere"):
        merge_checkpoints.main(["--config", str(config), "--output_dir", str(tmp_path / "out2"), "--quiet"])


def test_a_lora_adapter_folder_in_a_config_is_refused_naming_the_other_way(family, tmp_path):
    import merge_checkpoints

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    text = fill_model_paths("merge_method: task_arithmetic\nbase_model: @base\nmodels:\n"
                            "  - model: @ft0\n    parameters: {weight: 0.5}\n", family, MODELS)
    text += f"  - model: {adapter}\n    parameters: {{weight: 0.5}}\n"
    (tmp_path / "merge.yml").write_text(text)
    with pytest.raises(ValueError, match=r"PEFT LoRA adapter folder; --config takes full models.*without --config"):
        merge_checkpoints.main(["--config", str(tmp_path / "merge.yml"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
