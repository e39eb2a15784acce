"""examples/dlrm/train.py's checks that need no launch: argument refusals at parse time,
--help defaults, CSV labels, the epochs note, the `--cpu --num_processes N` detection,
the resume position on another world size, the sampler's mid-epoch start, the
checkpoint inspection and retention (in-process, fast)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    """The main job's functions, from the modules of examples/dlrm/ that hold them."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from dlrm import config, data, fsdp2, run_folder

        yield types.SimpleNamespace(**{k: v for m in (data, run_folder, fsdp2, config) for k, v in vars(m).items()
                                       if not k.startswith("__")})
    finally:
        sys.path.remove(str(ROOT / "examples"))


@pytest.mark.parametrize("argv, message", [
    (["--final-sparsity", "1.5"], "argument --final-sparsity: 1.5 is outside [0, 1]"),
    (["--final-sparsity", "-0.1"], "argument --final-sparsity: -0.1 is outside [0, 1]"),
    (["--final-sparsity", "nan"], "argument --final-sparsity: nan is outside [0, 1]"),
    (["--lr", "0"], "argument --lr: 0 must be > 0"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    (["--batch-size", "1.5"], "argument --batch-size: '1.5' is not an integer"),
    (["--max-steps", "0"], "argument --max-steps: 0 must be >= 1"),
    (["--keep", "0"], "argument --keep: 0 must be >= 1"),
    (["--save-every", "-1"], "argument --save-every: -1 must be >= 0"),
    (["--rows", "5"], "argument --rows: 5 must be >= 20"),
    (["--crash-at-step", "700"], "argument --crash-at-step: 700 is after --max-steps 600"),
    (["--csv", "/no/such/file.csv"], "argument --csv: '/no/such/file.csv' is not a file"),
    (["--resume", "/no/such/ckpt"], "argument --resume: '/no/such/ckpt' is neither 'auto', 'none' nor"),
])
def test_bad_arguments_are_refused_at_parse_time(job, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        job.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_only_rank_0_prints_a_usage_error(job, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        job.parse_args(["--final-sparsity", "1.5"])
    assert capsys.readouterr().err == ""


def test_help_shows_every_default(job, capsys):
    with pytest.raises(SystemExit) as e:
        job.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: runs/dlrm)", "(default: 600)", "(default: 512)", "(default: 0.004)",
                    "(default: 0.8)", "(default: 100)", "(default: 300)", "(default: 200)", "(default: auto)"):
        assert default in text, default


def test_csv_labels_must_be_0_or_1_with_the_line_number(job, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("user,item,label\nu1,i1,1\nu2,i1,0\n# comment\nu1,i2,1.0\n")
    data = job.csv_clicks(str(good), 10)
    assert data["label"].tolist() == [1.0, 0.0, 1.0]
    for bad in ("2", "0.5", "-1", "nan"):
        path = tmp_path / f"bad_{bad}.csv"
        path.write_text(f"user,item,label\nu1,i1,1\nu2,i1,0\nu3,i2,{bad}\n")
        with pytest.raises(ValueError, match=rf"bad_{bad}\.csv:4: label '{bad}' is not 0 or 1"):
            job.csv_clicks(str(path), 10)


def test_the_run_says_how_many_epochs_and_warns_when_many(job):
    # 45k rows -> 40500 training rows; 1024 per step -> 39 steps per epoch; 600 steps = 15.4 epochs
    many = job.epochs_note(600, 0, 39, 40500)
    assert many.startswith("the run makes 600 steps = 15.38 epochs over the 40500 training rows")
    assert "warning: 15.4 passes over the same rows" in many
    few = job.epochs_note(600, 200, 351, 360000)
    assert few == "the run makes 600 steps = 1.71 epochs over the 360000 training rows (400 steps = 1.14 epochs left)"


def test_a_cpu_launch_that_started_one_of_several_processes_is_detected(job, monkeypatch):
    for k in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert job.launch_mistake([]) is None                       # plain `python train.py`
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert job.launch_mistake([]) is None                       # `accelerate launch --cpu` (one process asked)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")              # set only when several were asked for
    text = job.launch_mistake(["--max-steps", "5"])
    assert "started ONE process although several were asked for" in text
    assert "accelerate launch --config_file launch/cpu_2proc.yaml examples/dlrm/train.py --max-steps 5" in text
    monkeypatch.setenv("WORLD_SIZE", "2")                       # torchrun / --multi_gpu: fine
    assert job.launch_mistake([]) is None


def test_resume_position_same_size_old_format_and_resized(job):
    st = {"step": 40, "epoch": 1, "epoch_position": 3072, "world_size": 2, "batch_size": 128}
    assert job.position_after_resume(st, 7200, 128, 2, 28) == (1, 3072, None)
    old = {"step": 40, "epoch": 1, "batch_in_epoch": 12, "world_size": 2}   # written before epoch_position
    assert job.position_after_resume(old, 7200, 128, 2, 28) == (1, 3072, None)
    epoch, pos, note = job.position_after_resume(st, 7200, 128, 3, 18)
    assert (epoch, pos) == (1, 3072)
    assert "global batch 256 -> 384 samples per step, 28 -> 18 steps per epoch" in note
    assert "its remaining 4128 samples make 10 steps, the last 288 are dropped (drop_last; 32 at the old size)" in note
    assert "no sample of it is seen again or skipped" in note


def test_sampler_enters_the_resumed_epoch_at_its_sample_and_later_epochs_whole(job):
    full = job.EpochSampler(50, seed=7)
    full.set_epoch(3)
    order3 = list(full)
    full.set_epoch(4)
    order4 = list(full)
    resumed = job.EpochSampler(50, seed=7)
    resumed.start_at(3, 20)
    resumed.set_epoch(3)               # what the loader does at the start of the pass
    assert list(resumed) == order3[20:] and len(resumed) == 30
    resumed.set_epoch(4)
    assert list(resumed) == order4 and len(resumed) == 50
    assert sorted(order3) == list(range(50)) and order3 != order4


def _ckpt(root, step, complete=True, state=None):
    p = root / f"step_{step:06d}"
    p.mkdir(parents=True)
    (p / "train_state.json").write_text(json.dumps(state or {"step": step, "sparse": True, "baseline": True}))
    if complete:
        (p / "COMPLETE").write_text(f"{step}\n")
    return p


def test_inspect_checkpoint_skips_unusable_folders_and_stops_on_another_configuration(job, tmp_path):
    assert job.inspect_checkpoint(_ckpt(tmp_path, 10, complete=False), True, True) == \
        ("skip", "no COMPLETE marker: its save did not finish")
    p = _ckpt(tmp_path, 20)
    (p / "train_state.json").write_text("{not json")
    kind, why = job.inspect_checkpoint(p, True, True)
    assert kind == "skip" and why.startswith("train_state.json unreadable")
    p = _ckpt(tmp_path, 30)
    assert job.inspect_checkpoint(p, True, True) == ("ok", {"step": 30, "sparse": True, "baseline": True})
    kind, why = job.inspect_checkpoint(p, True, False)   # resumed with --no-baseline
    assert kind == "fatal" and "was written with a dense baseline model" in why
    kind, why = job.inspect_checkpoint(p, False, False)  # resumed with --dense
    assert kind == "fatal" and "was written by a sparse run" in why


def test_inspect_checkpoint_checks_the_recorded_sha256_of_accelerates_files(job, tmp_path):
    p = tmp_path / "step_000040"
    p.mkdir()
    (p / "model.safetensors").write_bytes(b"weights")
    (p / "optimizer.bin").write_bytes(b"moments")
    files = {n: job.file_sha256(p / n) for n in ("model.safetensors", "optimizer.bin")}
    (p / "train_state.json").write_text(json.dumps({"step": 40, "sparse": True, "baseline": True, "files": files}))
    (p / "COMPLETE").write_text("40\n")
    assert job.inspect_checkpoint(p, True, True)[0] == "ok"
    (p / "model.safetensors").write_bytes(b"weighty")            # one byte changed: loads silently otherwise
    assert job.inspect_checkpoint(p, True, True) == \
        ("skip", "model.safetensors does not match its sha256 in train_state.json (damaged file)")
    (p / "model.safetensors").unlink()
    assert job.inspect_checkpoint(p, True, True) == ("skip", "model.safetensors is missing")


class _OneProcess:
    """The accelerator surface save_checkpoint uses, for one process."""
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"weights")


@pytest.mark.parametrize("keep, kept", [(1, []), (2, ["step_000020"])])
def test_retention_counts_only_trusted_checkpoints_at_or_before_the_new_one(job, tmp_path, keep, kept):
    for s in (10, 20, 50):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 30)                       # skipped as damaged when the run resumed
    _ckpt(tmp_path, 15, complete=False)       # an interrupted save
    distrusted = {"step_000030"}
    job.save_checkpoint(_OneProcess(), tmp_path, 40, {"step": 40}, keep, distrusted)
    left = sorted(p.name for p in tmp_path.iterdir())
    # the damaged one and the newer one are neither counted nor deleted; the interrupted one goes
    assert left == sorted(kept + ["step_000030", "step_000040", "step_000050"])
    assert (tmp_path / "step_000040" / "COMPLETE").read_text() == "40\n"
    state = json.loads((tmp_path / "step_000040" / "train_state.json").read_text())
    assert state == {"step": 40, "files": {"model.safetensors": job.file_sha256(tmp_path / "step_000040" /
                                                                                "model.safetensors")}}


def test_fsdp2_is_an_option_off_by_default(job, capsys):
    assert job.parse_args([]).fsdp2 is False and job.parse_args(["--fsdp2"]).fsdp2 is True
    with pytest.raises(SystemExit):
        job.parse_args(["--help"])
    assert "--fsdp2" in capsys.readouterr().out


def _adam_after_a_step():
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    return opt.state_dict(), names, shapes


def test_optimizer_state_by_index_and_by_name_round_trip(job):
    # torch's format (the DDP mode's optimizer.bin) <-> parameter names (FSDP2's full state dicts)
    sd, names, shapes = _adam_after_a_step()
    by_name = job.optimizer_by_name(sd, names, shapes, "optimizer.bin")
    assert sorted(by_name["state"]) == sorted(names) and by_name["param_groups"][0]["params"] == names
    assert torch.equal(by_name["state"]["0.weight"]["exp_avg"], sd["state"][0]["exp_avg"])
    back = job.optimizer_by_index(by_name)
    assert back["param_groups"] == sd["param_groups"]
    assert sorted(back["state"]) == sorted(sd["state"])
    for i, st in sd["state"].items():
        assert all(torch.equal(st[k], back["state"][i][k]) for k in st), i


def test_an_optimizer_file_of_another_model_is_refused_naming_the_file_and_parameter(job):
    sd, names, shapes = _adam_after_a_step()
    with pytest.raises(ValueError, match=r"optimizer_1\.bin: 3 parameters, this run's model has 2"):
        job.optimizer_by_name(sd, names[:2], {n: shapes[n] for n in names[:2]}, "optimizer_1.bin")
    wider = dict(shapes, **{"0.weight": [7, 8]})
    with pytest.raises(ValueError, match=r"optimizer\.bin: exp_avg of 0\.weight has shape \[7, 4\], "
                                         r"this run's parameter \[7, 8\]"):
        job.optimizer_by_name(sd, names, wider, "optimizer.bin")
    with pytest.raises(ValueError, match=r"optimizer\.bin: not a torch optimizer state dict"):
        job.optimizer_by_name({"weights": 1}, names, shapes, "optimizer.bin")


def test_a_model_file_of_another_model_is_refused_naming_the_tensor(job):
    shapes = {"tables.user.weight": [400, 16], "top.0.bias": [64]}
    good = {"tables.user.weight": torch.zeros(400, 16), "top.0.bias": torch.zeros(64)}
    job.check_model_state(good, shapes, "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tables\.user\.weight has shape \[400, 8\], "
                                         r"this run's model \[400, 16\]"):
        job.check_model_state(dict(good, **{"tables.user.weight": torch.zeros(400, 8)}), shapes, "model.safetensors")
    with pytest.raises(ValueError, match=r"model_1\.safetensors: missing \['top\.0\.bias'\]; unexpected \['x'\]"):
        job.check_model_state({"tables.user.weight": torch.zeros(400, 16), "x": torch.zeros(1)}, shapes,
                              "model_1.safetensors")


def test_inspect_checkpoint_takes_both_modes_and_refuses_an_unknown_one_by_name(job, tmp_path):
    for step, mode in ((10, "ddp"), (20, "fsdp2")):
        p = _ckpt(tmp_path, step, state={"step": step, "sparse": True, "baseline": True, "mode": mode})
        assert job.inspect_checkpoint(p, True, True)[0] == "ok"
    p = _ckpt(tmp_path, 30, state={"step": 30, "sparse": True, "baseline": True, "mode": "tp"})
    kind, why = job.inspect_checkpoint(p, True, True)
    assert kind == "fatal" and "was written in mode 'tp'" in why and "modes ddp, fsdp2" in why, why


def test_save_checkpoint_checksums_what_a_custom_writer_wrote(job, tmp_path):
    def write(path):   # the FSDP2 mode's writer stands in for accelerator.save_state
        (path / "model.safetensors").write_bytes(b"full weights")
        (path / "random_states_0.pkl").write_bytes(b"rng")

    class NoSaveState(_OneProcess):
        def save_state(self, path):
            raise AssertionError("save_state must not be called when a writer is given")

    job.save_checkpoint(NoSaveState(), tmp_path, 40, {"step": 40, "mode": "fsdp2"}, 2, set(), write)
    folder = tmp_path / "step_000040"
    state = json.loads((folder / "train_state.json").read_text())
    assert state["mode"] == "fsdp2" and sorted(state["files"]) == ["model.safetensors", "random_states_0.pkl"]
    assert (folder / "COMPLETE").read_text() == "40\n"


def test_a_ramp_ending_after_the_last_step_is_announced(job, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    args = job.parse_args(["--max-steps", "20", "--start-step", "5", "--ramp-steps", "15"])
    assert "masks reach --final-sparsity 0.8 at step 21" in job.ramp_note(args)
    assert "after --max-steps 20" in job.ramp_note(args)
    assert job.ramp_note(job.parse_args(["--max-steps", "21", "--start-step", "5", "--ramp-steps", "15"])) is None
    assert job.ramp_note(job.parse_args(["--max-steps", "20", "--ramp-steps", "15", "--dense"])) is None
