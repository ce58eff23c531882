"""The command line: parameter counts, ArrayRecord conversion, and errors as messages with exit code 2."""

import json

from xlstm_eqx.cli import main
from xlstm_eqx.data import open_documents


def test_params_of_a_preset(capsys):
    assert main(["params", "--config", "configs/bench_a.yaml"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 4_271_392


def test_param_table_of_a_preset_on_a_mesh_it_needs_no_devices_for(capsys):
    args = ["mesh.data=-1", "mesh.fsdp=4", "mesh.model=2", "mesh.fsdp_min_weight_size=0"]
    assert main(["params", "--config", "configs/bench_a.yaml", "--table", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert rows["blocks.mlstm_layer.q.weight"][1:] == ["4×128×256", "float32", "131,072", "(None,", "model,", "fsdp)",
                                                        "yes"]  # fmt: skip
    assert rows["blocks.norm_ffn.weight"][-1] == "no" and rows["embedding.weight"][-1] == "no"  # decay excluded
    assert lines[-1].startswith("total 4,271,392 parameters in ")
    assert main(["params", "--config", "configs/bench_a.yaml", "--table", "optim.weight_decay=0"]) == 0
    assert not [line for line in capsys.readouterr().out.splitlines()[1:-1] if line.split()[-1] == "yes"]


def test_convert_jsonl_to_array_record_round_trips(tmp_path, capsys):
    docs = ["To be, or not to be.", "All the world's a stage,\nand all the men and women merely players."]
    source = tmp_path / "docs.jsonl"
    source.write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    out = tmp_path / "docs.arecord"
    assert main(["convert", str(source), "--out", str(out), "--text-field", "body"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 2
    records = open_documents(out)
    assert [bytes(records[i]).decode() for i in range(len(records))] == docs


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "kept"}\n')
    assert main(["convert", str(good), "--out", str(tmp_path / "x.arecord")]) == 0
    assert main(["convert", str(bad), "--out", str(tmp_path / "x.arecord")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    kept = open_documents(tmp_path / "x.arecord")  # the failed conversion neither truncated nor replaced it
    assert [bytes(kept[i]).decode() for i in range(len(kept))] == ["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl", "x.arecord"]  # no leftovers
    assert main(["params", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_tokenizer_command_trains_one_that_loads(tmp_path, capsys):
    from xlstm_eqx.data.tokenizer import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 50)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "--corpus", str(text), "--vocab-size", "300", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    tokenizer = Tokenizer.load(out)
    assert tokenizer.vocab_size <= 300 and tokenizer.decode(tokenizer.encode("to be")) == "to be"
