"""`distsparse inspect` / `verify` (issue 21 item 4) on good, damaged and foreign files,
and `distsparse.__version__` from the package metadata."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import distsparse
from distsparse import CubicScheduler, DataNormSparsifier, save_checkpoint, save_sparse_data
from distsparse.checkpoint import CheckpointError, CheckpointNotFoundError, verify_checkpoint
from distsparse.cli import main
from distsparse.distributed.rects import RectShards

ROOT = Path(__file__).resolve().parents[1]


def _sparsifier() -> tuple[DataNormSparsifier, CubicScheduler]:
    g = torch.Generator().manual_seed(0)
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("emb.weight", torch.nn.Parameter(torch.randn(64, 16, generator=g)))
    sp.add_data("odd", torch.randn(7, 10, generator=g, dtype=torch.float64), sparse_block_shape=(2, 3),
                sparsity_level=0.25)
    sch = CubicScheduler(sp, final_value=0.5, ramp_steps=4)
    for _ in range(6):
        sp.step()
        sch.step()
    sp.step()  # masks at the scheduler's final level
    return sp, sch


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    sp, sch = _sparsifier()
    out = {"checkpoint": folder / "sparsity.safetensors", "export": folder / "tables.safetensors",
           "plain": folder / "plain.safetensors", "text": folder / "notes.txt"}
    save_checkpoint(out["checkpoint"], sp, sch)
    save_sparse_data(out["export"], sp)
    save_file({"w": torch.zeros(3)}, str(out["plain"]), metadata={"format": "pt"})
    out["text"].write_text("not a safetensors file\n")
    out["masks"] = {n: sp.get_mask(n) for n in ("emb.weight", "odd")}
    out["pruned"] = _pruned_tables_file(folder / "pruned.safetensors")
    out["v1"] = _rewrite(out["checkpoint"], folder / "v1.safetensors", version="1",
                         edit=lambda state: state.update(writer={"group_ranks": [0], "world_size": 1, "job": "ab12"}))
    sharded = _sharded_sparsifier()
    out["sharded"] = folder / "sharded.safetensors"
    save_checkpoint(out["sharded"], sharded)
    out["sharded_sparsity"] = sharded.sparsity()
    return out


def _sharded_sparsifier() -> DataNormSparsifier:
    """One process holding every rectangle of a 12 x 8 table cut in 2 x 2 (a TorchRec layout),
    next to a replicated table: format 2 stores the rectangles' masks as they are, as pieces."""
    data = torch.randn(12, 8, generator=torch.Generator().manual_seed(2))
    rects = [((r0, c0), data[r0:r1, c0:c1]) for r0, r1 in ((0, 5), (5, 12)) for c0, c1 in ((0, 3), (3, 8))]
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2, 3))
    sp.add_data("t", RectShards((12, 8), rects))
    sp.add_data("emb.weight", torch.nn.Parameter(torch.randn(9, 6, generator=torch.Generator().manual_seed(3))))
    sp.step()
    return sp


def _header(blob: bytes) -> tuple[int, dict]:
    n = int.from_bytes(blob[:8], "little")
    return 8 + n, json.loads(blob[8 : 8 + n])


def _rewrite(src: Path, dst: Path, version: str | None = None, edit=None, drop: tuple[str, ...] = ()) -> Path:
    """``src`` with its JSON state edited (and its checksum redone: only the edit differs),
    its format_version set, tensors ``drop`` removed."""
    import hashlib

    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(src)).items() if k not in drop}
    meta = _header(src.read_bytes())[1]["__metadata__"]
    state = json.loads(meta["state"])
    if edit is not None:
        edit(state)
    text = json.dumps(state, sort_keys=True, separators=(",", ":"))
    meta.update(state=text, json_sha256=hashlib.sha256(text.encode()).hexdigest())
    if version is not None:
        meta["format_version"] = version
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _pruned_tables_file(path: Path) -> Path:
    """A `distsparse.pruned_tables` file as its format documents it (distsparse.pruned, being
    added on another branch): 6 rows of 4, rows 1 and 4 kept."""
    import hashlib

    tensors = {"remap/emb": torch.tensor([-1, 0, -1, -1, 1, -1], dtype=torch.int32),
               "weight/emb": torch.arange(8, dtype=torch.float32).reshape(2, 4)}
    checksums = {k: hashlib.sha256(t.numpy().tobytes()).hexdigest() for k, t in tensors.items()}
    text = json.dumps({"tables": {"emb": {"shape": [6, 4], "rows": 6, "dim": 4, "kept": 2, "encoding": "float32",
                                          "source_dtype": "float32"}}, "checksums": checksums}, sort_keys=True)
    save_file(tensors, str(path), metadata={"format": "distsparse.pruned_tables", "format_version": "1",
                                            "state": text, "json_sha256": hashlib.sha256(text.encode()).hexdigest()})
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _damaged(src: Path, dst: Path, offset_from_end: int) -> Path:
    blob = bytearray(src.read_bytes())
    blob[-offset_from_end] ^= 0xFF
    dst.write_bytes(bytes(blob))
    return dst


def test_version_comes_from_the_installed_package_metadata():
    assert distsparse.__version__ == importlib.metadata.version("distsparse")


def test_inspect_json_of_a_checkpoint_reports_each_groups_measured_sparsity_and_the_schedule(files, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["checkpoint"]), "--json")
    assert rc == 0
    info = json.loads(out)
    assert (info["format"], info["format_version"]) == ("distsparse.checkpoint", "2")
    assert info["world_size"] == 1 and info["sparsifier"]["step_count"] == 7
    emb, odd = info["groups"]["emb.weight"], info["groups"]["odd"]
    for name, g in (("emb.weight", emb), ("odd", odd)):
        mask = files["masks"][name]
        assert g["sparsity"] == 1.0 - int(mask.sum()) / mask.numel()
        assert g["bytes"] == (mask.numel() + 7) // 8
    assert emb["shape"] == [64, 16] and emb["block_shape"] == [1, 4] and emb["level"] == 0.5
    assert odd["block_shape"] == [2, 3] and odd["level"] == pytest.approx(0.5)
    assert emb["sparsity"] == 0.5
    assert info["scheduler"]["scheduler"] == "CubicScheduler" and info["scheduler"]["last_epoch"] == 6


def test_inspect_text_of_a_checkpoint_is_a_table_with_one_row_per_group(files, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["checkpoint"]))
    assert rc == 0
    assert "distsparse.checkpoint version 2" in out and "world size 1" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("emb.weight"))
    assert row.split()[1:] == ["replicated", "64x16", "-", "1x4", "0.5000", "0.5000", "128"]
    assert "scheduler CubicScheduler: last_epoch 6" in out


def test_inspect_of_an_export_reports_dtype_block_sparsity_and_stored_bytes(files, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["export"]), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["format"] == "distsparse.sparse_data"
    odd = info["groups"]["odd"]
    assert odd["dtype"] == "float64" and odd["block_shape"] == [2, 3] and odd["shape"] == [7, 10]
    # whole blocks are zeroed (zeros_per_block=None): block sparsity equals the mask's
    assert odd["sparsity"] == pytest.approx(1.0 - int(files["masks"]["odd"].sum()) / 70)
    assert info["groups"]["emb.weight"]["bytes"] < info["groups"]["emb.weight"]["dense_bytes"]


def test_inspect_of_pruned_tables_reports_the_kept_rows_from_the_header(files, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["pruned"]), "--json")
    assert rc == 0
    emb = json.loads(out)["groups"]["emb"]
    assert emb["kept_rows"] == 2 and emb["sparsity"] == pytest.approx(4 / 6)
    assert emb["bytes"] == 6 * 4 + 2 * 4 * 4 and emb["block_shape"] == [1, 4] and emb["dtype"] == "float32"


def test_verify_accepts_good_files(files, capsys):
    for key in ("checkpoint", "export", "pruned"):
        rc, out, err = _run(capsys, "verify", str(files[key]))
        assert rc == 0 and "OK" in out, err


@pytest.mark.parametrize("key", ["checkpoint", "export", "pruned"])
def test_verify_names_a_flipped_byte_in_a_tensor_and_exits_1(files, tmp_path, capsys, key):
    bad = _damaged(files[key], tmp_path / f"bad_{key}.safetensors", 1)   # the last data byte
    rc, _, err = _run(capsys, "verify", str(bad))
    assert rc == 1
    assert "DAMAGED" in err and "checksum" in err and str(bad) in err


def test_verify_names_a_truncated_checkpoint_and_exits_1(files, tmp_path, capsys):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(files["checkpoint"].read_bytes()[:-5])
    rc, _, err = _run(capsys, "verify", str(bad))
    assert rc == 1 and "truncated" in err
    rc, _, err = _run(capsys, "inspect", str(bad))
    assert rc == 1 and "DAMAGED" in err


def test_foreign_files_are_refused_with_exit_2_naming_why(files, tmp_path, capsys):
    for command in ("inspect", "verify"):
        rc, _, err = _run(capsys, command, str(files["plain"]))
        assert rc == 2 and "unknown format 'pt'" in err
        rc, _, err = _run(capsys, command, str(files["text"]))
        assert rc == 2 and "not a safetensors file" in err
        rc, _, err = _run(capsys, command, str(tmp_path / "missing.safetensors"))
        assert rc == 2 and "no such file" in err


def test_inspect_reads_only_the_masks_not_the_exported_values(files, monkeypatch, capsys):
    from safetensors import safe_open

    read: list[str] = []
    real = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def metadata(self):
            return self._f.metadata()

        def get_tensor(self, key):
            read.append(key)
            return self._f.get_tensor(key)

    monkeypatch.setattr("safetensors.safe_open", Spy)
    assert _run(capsys, "inspect", str(files["export"]))[0] == 0
    assert read and all(k.startswith("blocks/") for k in read)


def test_the_console_script_entry_point_is_the_clis_main():
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert section.strip() == 'distsparse = "distsparse.cli:main"'  # (tomllib needs Python 3.11)


def test_python_dash_m_distsparse_runs_the_cli(files):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "distsparse", "inspect", str(files["checkpoint"])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "emb.weight" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "distsparse", "verify", str(files["plain"])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2


# -- format version 2: sharded groups stored as their pieces; version 1 files still read ---------


def test_inspect_of_a_sharded_checkpoint_sums_the_measured_sparsity_over_the_pieces(files, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["sharded"]), "--json")
    assert rc == 0
    info = json.loads(out)
    assert (info["format_version"], info["world_size"], info["writer"]) == ("2", 1, None)
    t = info["groups"]["t"]
    assert (t["scope"], t["shape"], t["tensors"]) == ("sharded", [12, 8], 4)
    assert t["sparsity"] == files["sharded_sparsity"]["t"]
    assert t["bytes"] == sum((rows * cols + 7) // 8 for rows in (5, 7) for cols in (3, 5))
    assert info["groups"]["emb.weight"]["sparsity"] == files["sharded_sparsity"]["emb.weight"]
    rc, out, _ = _run(capsys, "inspect", str(files["sharded"]))
    assert "distsparse.checkpoint version 2" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("t "))
    assert row.split()[1:] == ["sharded", "12x8", "-", "2x3", "0.5000", f"{files['sharded_sparsity']['t']:.4f}",
                               str(t["bytes"])]


def test_verify_checkpoint_reads_every_piece_and_summarizes_the_file(files):
    summary = verify_checkpoint(files["sharded"])
    t = summary["groups"]["t"]
    assert (summary["format_version"], t["numel"], t["tensors"]) == ("2", 96, 4)
    assert 1.0 - (t["numel"] - t["zeros"]) / t["numel"] == files["sharded_sparsity"]["t"]
    assert summary["bytes"] == files["sharded"].stat().st_size
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        verify_checkpoint(files["sharded"].with_name("missing.safetensors"))


def test_verify_names_a_flipped_byte_in_a_piece_of_a_sharded_group(files, tmp_path, capsys):
    blob = bytearray(files["sharded"].read_bytes())
    data, header = _header(bytes(blob))
    key = "piece/5,3/t"
    start, end = header[key]["data_offsets"]
    blob[data + start] ^= 0x01
    bad = tmp_path / "bad_piece.safetensors"
    bad.write_bytes(bytes(blob))
    rc, _, err = _run(capsys, "verify", str(bad))
    assert rc == 1
    assert f"tensor {key!r} does not match its sha256 checksum" in err and str(bad) in err


def test_verify_refuses_pieces_that_do_not_tile_the_table_or_miscount_their_zeros(files, tmp_path):
    def drop_last(state):
        r, c = state["groups"]["t"]["pieces"].pop()[:2]
        del state["checksums"][f"piece/{r},{c}/t"]

    gap = _rewrite(files["sharded"], tmp_path / "gap.safetensors", edit=drop_last, drop=("piece/5,3/t",))
    with pytest.raises(CheckpointError, match=r"group 't'.*cover 61 of the table's 96 elements"):
        verify_checkpoint(gap)

    def miscount(state):
        state["groups"]["t"]["pieces"][0][4] += 1

    wrong = _rewrite(files["sharded"], tmp_path / "miscount.safetensors", edit=miscount)
    with pytest.raises(CheckpointError, match=r"group 't': piece 'piece/0,0/t' records \d+ pruned elements"):
        verify_checkpoint(wrong)


def test_a_version_1_checkpoint_still_inspects_and_verifies(files, tmp_path, capsys):
    rc, out, _ = _run(capsys, "inspect", str(files["v1"]))
    assert rc == 0
    assert "distsparse.checkpoint version 1" in out and "writer: group ranks [0], job world size 1" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("emb.weight"))
    assert row.split()[1:] == ["replicated", "64x16", "-", "1x4", "0.5000", "0.5000", "128"]
    rc, out, err = _run(capsys, "verify", str(files["v1"]))
    assert rc == 0 and "OK" in out, err
    bad = _damaged(files["v1"], tmp_path / "bad_v1.safetensors", 1)
    rc, _, err = _run(capsys, "verify", str(bad))
    assert rc == 1 and "checksum" in err
