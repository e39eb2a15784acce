"""Lightning callbacks (distsparse.integrations.lightning): torch.ao's arguments, the model
being trained sparsified, checkpoints that load with weights_only=True and resume exactly,
2 DDP processes on CPU (gloo) with identical masks, and FSDP2 (ModelParallelStrategy +
fully_shard) on 2 CPU processes: sharded groups, logging without collectives, exact resume."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
from torch import nn

import distsparse
from distsparse.integrations.lightning import (
    PostTrainingDataSparsity,
    TrainingAwareDataSparsity,
    select_parameters,
)
from distsparse.masks import packed_size, unpack_bits

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ARGS = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}  # torch.ao's test values


class DummyModel(nn.Module):  # torch.ao's test model
    def __init__(self, iC: int, oC: list[int]) -> None:
        super().__init__()
        self.linears = nn.Sequential()
        i = iC
        for idx, c in enumerate(oC):
            self.linears.append(nn.Linear(i, c, bias=False))
            if idx < len(oC) - 1:
                self.linears.append(nn.ReLU())
            i = c


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = DummyModel(12, [16, 8, 1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model.linears(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class StepSLScheduler(distsparse.BaseDataScheduler):
    """torch.ao's test scheduler: each level times gamma every step_size epochs."""

    def __init__(self, data_sparsifier, schedule_param="sparsity_level", step_size=1, gamma=2,
                 last_epoch=-1, verbose=False):
        self.gamma, self.step_size = gamma, step_size
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def get_schedule_param(self):
        groups = self.data_sparsifier.data_groups
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return {name: config[self.schedule_param] for name, config in groups.items()}
        return {name: config[self.schedule_param] * self.gamma for name, config in groups.items()}


def loader(n: int = 48) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 12, generator=g), torch.randn(n, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def make_trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    kw = {"max_epochs": 2, **kw}
    return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def training_aware(**kw) -> TrainingAwareDataSparsity:
    return TrainingAwareDataSparsity(distsparse.DataNormSparsifier, {"sparsity_level": 0.1},
                                     distsparse.LinearScheduler, {"final_value": 0.75, "initial_value": 0.1,
                                                                  "ramp_steps": 8}, **kw)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        yield


def test_torch_ao_arguments_sparsify_the_model_being_trained_under_its_own_names(tmp_path):
    cb = TrainingAwareDataSparsity(data_sparsifier_class=distsparse.DataNormSparsifier,
                                   data_sparsifier_args={**ARGS, "sparsity_level": 0.1},
                                   data_scheduler_class=StepSLScheduler,
                                   data_scheduler_args={"gamma": 2, "step_size": 1})
    module = Module()
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    trainer.fit(module, loader())
    sp = cb.data_sparsifier
    assert sorted(sp.data_groups) == ["linears.0.weight", "linears.2.weight", "linears.4.weight"]
    assert cb.sparsified is module.model
    # 3 epochs, one step each: 0.1 * 2**3 (torch.ao's test checks the same gamma law)
    assert cb.data_scheduler.get_last_param() == {n: pytest.approx(0.8) for n in sp.data_groups}
    assert sp.step_count == 3 and cb.data_scheduler.last_epoch == 3
    for name, param in module.model.named_parameters():
        mask = sp.get_mask(name)
        assert 0 < 1 - mask.float().mean() < 1
        assert torch.equal(param.detach() != 0, mask)  # squashed into the trained weights
        assert trainer.callback_metrics[f"sparsity/{name}"] == pytest.approx(1 - float(mask.float().mean()))


def test_torch_ao_post_training_flow_sparsifies_a_copy():
    """torch.ao's own test calls on_fit_end(42, pl_module) without a Trainer."""
    cb = PostTrainingDataSparsity(distsparse.DataNormSparsifier, ARGS)
    module = Module()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb.on_fit_end(42, module)
    for key, value in ARGS.items():
        assert cb.data_sparsifier.defaults[key] == value
    assert cb.sparsified is not module.model and not cb.sparsified.training
    for name, param in module.model.named_parameters():
        assert torch.equal(param.detach(), before[name])  # the trained model is untouched
        mask = cb.data_sparsifier.get_mask(name)
        assert 1 - mask.float().mean() == 0.5
        copy = dict(cb.sparsified.named_parameters())[name].detach()
        assert torch.equal(copy, torch.where(mask, before[name], 0.0))


def test_every_n_train_steps_counts_optimizer_steps_not_batches(tmp_path):
    cb = training_aware(every_n_train_steps=3)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(Module(), loader(48))  # 6 batches per epoch = 3 optimizer steps
    assert trainer.global_step == 6
    assert cb.data_sparsifier.step_count == 2 and cb.last_step_at == 6


def test_checkpoint_state_loads_with_weights_only_and_holds_bit_packed_masks(tmp_path):
    cb = training_aware(every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(Module(), loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    state = ckpt["callbacks"]["TrainingAwareDataSparsity"]
    assert state["format"] == "distsparse.lightning" and state["last_step_at"] == 12
    assert state["scheduler"]["last_epoch"] == 6 and state["sparsifier"]["step_count"] == 6
    for name, packed in state["masks"].items():
        shape = tuple(state["sparsifier"]["groups"][name]["shape"])
        assert packed.dtype == torch.uint8 and packed.numel() == packed_size(int(torch.tensor(shape).prod()))
        assert torch.equal(unpack_bits(packed, shape), cb.data_sparsifier.get_mask(name))
    json.dumps({k: v for k, v in state.items() if k != "masks"})  # everything else is JSON


def test_resume_restores_masks_schedule_and_counters_exactly(tmp_path):
    full, module_full = training_aware(every_n_train_steps=2), Module()
    make_trainer(tmp_path, [full], max_epochs=3).fit(module_full, loader())
    part = training_aware(every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [part], max_epochs=1)
    trainer.fit(Module(), loader())
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    resumed, module = training_aware(every_n_train_steps=2), Module()
    make_trainer(tmp_path, [resumed], max_epochs=3).fit(module, loader(), ckpt_path=tmp_path / "e1.ckpt",
                                                        weights_only=True)
    a, b = full.data_sparsifier, resumed.data_sparsifier
    assert a.step_count == b.step_count == 9 and resumed.last_step_at == full.last_step_at == 18
    assert full.data_scheduler.state_dict() == resumed.data_scheduler.state_dict()
    for name in a.data_groups:
        assert torch.equal(a.get_mask(name), b.get_mask(name))
    for (n, p), (_, q) in zip(module_full.named_parameters(), module.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_from_a_checkpoint_without_sparsity_state_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(Module(), loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain\.ckpt'?, which holds no TrainingAwareDataSparsity state"):
        make_trainer(tmp_path, [training_aware()], max_epochs=2).fit(Module(), loader(),
                                                                      ckpt_path=tmp_path / "plain.ckpt")


def test_resume_with_another_stepping_interval_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [training_aware(every_n_train_steps=2)], max_epochs=1)
    trainer.fit(Module(), loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="every_n_train_steps=2, this callback has 3"):
        make_trainer(tmp_path, [training_aware(every_n_train_steps=3)]).fit(Module(), loader(),
                                                                            ckpt_path=tmp_path / "a.ckpt")


def test_a_pytorch_lightning_trainer_torch_aos_import_runs_the_callbacks_too(tmp_path):
    import pytorch_lightning as pl

    class Legacy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Linear(12, 4)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb, module = training_aware(), Legacy()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, callbacks=[cb], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert cb.data_sparsifier.step_count == 2 and sorted(cb.data_sparsifier.data_groups) == ["bias", "weight"]
    assert torch.equal(module.model.weight.detach() != 0, cb.data_sparsifier.get_mask("weight"))
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["callbacks"]["TrainingAwareDataSparsity"]
    assert state["sparsifier"]["step_count"] == 2

def test_parameters_are_selected_by_pattern_callable_or_module_type():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 8), nn.LayerNorm(8))
    names = lambda **kw: [n for n, _ in select_parameters(model, **kw)]  # noqa: E731
    assert names() == ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias"]  # torch.ao: everything
    assert names(include="*.weight") == ["0.weight", "1.weight", "2.weight"]
    assert names(include=["0.*", "2.bias"]) == ["0.weight", "2.bias"]
    assert names(include=lambda n, p: p.dim() == 2) == ["0.weight", "1.weight"]
    assert names(module_types=(nn.Linear, nn.Embedding), include="*.weight") == ["0.weight", "1.weight"]
    with pytest.raises(TypeError, match="include must be"):
        select_parameters(model, include=[3])


def test_a_filter_matching_nothing_and_bad_interval_are_refused(tmp_path):
    with pytest.raises(ValueError, match="every_n_train_steps must be a positive int"):
        training_aware(every_n_train_steps=0)
    cb = training_aware(include="nothing*")
    with pytest.raises(ValueError, match=r"no parameter of DummyModel matches include='nothing\*'"):
        make_trainer(tmp_path, [cb]).fit(Module(), loader())


def test_two_ddp_processes_share_masks_and_resume_exactly(tmp_path):
    """Lightning's strategy="ddp" on CPU (2 gloo processes): see tests/_lightning_ddp_job.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(HERE / "_lightning_ddp_job.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # masks, weights, schedule, logs: identical on both ranks
    full, part, resumed = r0["full"], r0["part"], r0["resumed"]
    assert full["world"] == 2 and sorted(set(full["owners"].values())) == [0, 1]  # both ranks compute masks
    assert full["step_count"] == 12 and full["global_step"] == 24 and full["weights_match_masks"]
    assert part["step_count"] == 6 and 0.1 < min(part["sparsity"].values()) < 0.7  # interrupted mid-ramp
    assert resumed == full  # masks, weights, schedule, counters
    state = torch.load(r0["ckpt"], weights_only=True)["callbacks"]["TrainingAwareDataSparsity"]
    assert state["scheduler"]["last_epoch"] == 6 and state["sparsifier"]["world_size"] == 2
    post = r0["post"]
    assert post["groups"] == ["2.bias", "2.weight", "4.bias", "4.weight"] and not post["copy_is_model"]
    assert post["copy_zeros"]["2.weight"] == 0.5 and post["trained_zeros"]["2.weight"] == 0.0
    assert "Lightning runs 2 process(es) but the sparsifier's process group has 1 rank(s)" in r0["wrong_world"]


def test_the_core_never_imports_lightning_or_transformers():
    code = ("import sys, distsparse, distsparse.integrations; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_the_lightning_example_trains_and_resumes(tmp_path, monkeypatch, capsys):
    import runpy

    script = str(REPO / "examples" / "lightning_sparsity.py")
    for argv in (["--epochs", "1"], ["--epochs", "2", "--resume"]):
        monkeypatch.setattr(sys, "argv", [script, "--out", str(tmp_path), "--samples", "1024", *argv])
        runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert "world_size=1 global_step=16 sparsifier steps=1 scheduler epoch=1" in out
    assert "world_size=1 global_step=32 sparsifier steps=3 scheduler epoch=3" in out
    # The level the masks were computed with (cubic epoch 2), and the next one (epoch 3).
    last = out[out.index("global_step=32"):]
    assert "level 0.337 (next 0.46" in last and "next level" not in out
    assert "warning: 1 sparsifier steps: the masks reach the final level 0.8 at step 13" in out


def test_mask_params_hold_the_level_the_last_masks_were_computed_with(tmp_path):
    cb = training_aware(every_n_train_steps=3)
    assert cb.mask_params is None
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(Module(), loader(24))  # 3 optimizer steps per epoch: 2 sparsifier steps
    sp = cb.data_sparsifier
    assert sp.step_count == 2
    # epoch 1 of the 0.1 -> 0.75 ramp over 8 shaped the masks; data_groups holds epoch 2's
    assert cb.mask_params == {n: pytest.approx(0.1 + 0.65 / 8) for n in sp.data_groups}
    assert {n: c["sparsity_level"] for n, c in sp.data_groups.items()} == \
        {n: pytest.approx(0.1 + 2 * 0.65 / 8) for n in sp.data_groups}


def test_a_second_fit_continues_the_same_model_and_starts_fresh_for_another(tmp_path):
    cb, module = training_aware(), Module()
    make_trainer(tmp_path, [cb], max_epochs=1).fit(module, loader())
    first = cb.data_sparsifier
    make_trainer(tmp_path, [cb], max_epochs=1).fit(module, loader())
    assert cb.data_sparsifier is first and first.step_count == 2
    other = Module()
    make_trainer(tmp_path, [cb], max_epochs=1).fit(other, loader())
    assert cb.data_sparsifier is not first and cb.data_sparsifier.step_count == 1 and cb.sparsified is other.model


# ----------------------------------------------------------------------------------------
# FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes: sharded groups
# ----------------------------------------------------------------------------------------
# Lightning re-runs this file as a script for rank 1 (`python tests/test_lightning_integration.py
# fsdp2-job OUT`); both ranks run `_fsdp2_job` and write what they saw to OUT/rank<r>.json.


def test_fsdp2_model_parallel_strategy_sparsifies_the_sharded_tables_logs_without_collectives_and_resumes(
        tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               DISTSPARSE_COLLECTIVE_TIMEOUT="60")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, __file__, "fsdp2-job", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        full, resumed = r["full"], r["resumed"]
        # The callback holds FSDP2's DTensor parameter (built after configure_model), its rows
        # pruned and squashed into the local shard, the global mask the single-process one.
        assert full["group_is_the_trained_parameter"] and full["placements"] == "(Shard(dim=0),)"
        assert full["mask_is_reference"] and full["zeros_squashed"], full
        assert full["step_count"] == 4 and full["local_rows"] == [21, 20][r["rank"]]
        # Logged: this rank's own sparsity() figures, and no DTensor collective in the logging path
        # (while the old mask.float().mean() is one: the check can fail).
        assert full["logged"] == full["sparsity"] and full["log_collectives"] == 0, full
        assert full["old_way_collectives"] > 0
        assert full["rank0_log_alone"] == ({f"sparsity/{n}": v for n, v in full["sparsity"].items()}
                                           if r["rank"] == 0 else {})
        assert resumed == full  # masks, weights, schedule, counters: resumed from a DCP checkpoint
    assert r0["full"]["mask_digest"] == r1["full"]["mask_digest"]
    assert r0["full"]["state_mask_whole"] and r0["full"]["state_has_no_rows_only_entry"]


class _ShardedNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank
        self.emb = nn.Embedding(41, 8)  # 41 rows: shards of 21 / 20 rows
        self.head = nn.Linear(8, 1)
        self.logged: dict = {}

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if isinstance(self.emb.weight, nn.Parameter) and type(self.emb.weight.data).__name__ == "DTensor":
            return  # a second fit of the same module: already sharded
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.emb, mesh=mesh)  # the modules themselves: training_step bypasses forward
        fully_shard(self.head, mesh=mesh)

    def log(self, name, value, *args, **kwargs):
        self.logged[name] = float(value)
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.mse_loss(self.head(self.emb(ids).sum(1)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fsdp2_job(out: str) -> None:
    import hashlib

    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor.debug import CommDebugMode

    from distsparse.masks import norm_block_mask

    def sharded_loader() -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 41, (32, 3), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, torch.randn(32, generator=g)),
                                           batch_size=4)  # 2 ranks x 4 batches per epoch

    def trainer(epochs: int, callbacks: list, root: str) -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=2, max_epochs=epochs, callbacks=callbacks,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                        process_group_backend="gloo"),
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=root)

    def callback() -> TrainingAwareDataSparsity:
        return TrainingAwareDataSparsity(distsparse.DataNormSparsifier, {"sparsity_level": 0.2,
                                                                         "sparse_block_shape": (1, 4)},
                                         distsparse.LinearScheduler, {"final_value": 0.6, "initial_value": 0.2,
                                                                      "ramp_steps": 2},
                                         every_n_train_steps=2, include="emb.weight")

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]

    def summary(cb: TrainingAwareDataSparsity, net: _ShardedNet) -> dict:
        sp, weight = cb.data_sparsifier, net.emb.weight
        mask = sp.get_mask("emb.weight")
        full_weight, full_mask = weight.detach().full_tensor(), mask.full_tensor()
        level = sp.data_groups["emb.weight"]["sparsity_level"]  # reached at the 2nd step: every step's
        seen: dict = {}
        with CommDebugMode() as comm:  # the callback's logging path, on one rank only
            if dist.get_rank() == 0:
                cb._log_sparsity(SimpleNamespace(_trainer=object(), log=seen.__setitem__))
        with CommDebugMode() as old:  # what the callback used to do (a collective: every rank)
            1 - float(mask.float().mean())
        state = cb.state_dict()
        return {
            "group_is_the_trained_parameter": sp.get_data("emb.weight", return_original=True) is weight,
            "placements": str(mask.placements), "local_rows": mask.to_local().shape[0],
            "mask_is_reference": bool(torch.equal(full_mask, norm_block_mask(full_weight, level, (1, 4), 4, "L1"))),
            "zeros_squashed": bool((weight.detach().to_local()[~mask.to_local()] == 0).all()),
            "mask_digest": digest(full_mask), "weight_digest": digest(full_weight),
            "step_count": sp.step_count, "scheduler": cb.data_scheduler.state_dict(),
            "last_step_at": cb.last_step_at,
            "logged": {k.removeprefix("sparsity/"): v for k, v in net.logged.items()},
            "sparsity": sp.sparsity(),
            "log_collectives": comm.get_total_counts(), "rank0_log_alone": seen,
            "old_way_collectives": old.get_total_counts(),
            "state_mask_whole": bool(torch.equal(unpack_bits(state["masks"]["emb.weight"], (41, 8)), full_mask)),
            "state_has_no_rows_only_entry": "sharded" not in state["sparsifier"]["groups"]["emb.weight"],
        }

    result: dict = {}
    cb, net = callback(), _ShardedNet()
    trainer(2, [cb], f"{out}/full").fit(net, sharded_loader())
    result["full"] = summary(cb, net)
    result["rank"] = dist.get_rank()

    cb, net = callback(), _ShardedNet()
    t = trainer(1, [cb], f"{out}/part")
    t.fit(net, sharded_loader())
    t.save_checkpoint(f"{out}/epoch1.ckpt")  # every rank calls it: a distributed checkpoint folder
    cb, net = callback(), _ShardedNet()
    trainer(2, [cb], f"{out}/resumed").fit(net, sharded_loader(), ckpt_path=f"{out}/epoch1.ckpt")
    result["resumed"] = summary(cb, net)
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp2-job"]:
    warnings.simplefilter("ignore")
    _fsdp2_job(sys.argv[2])
