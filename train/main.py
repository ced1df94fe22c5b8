"""Train the anchor and/or its hierarchical memory over a run directory's pre-routed shards.

    deepspeed --num_gpus 2 train/main.py --data runs/demo --out runs/demo/model [--config CONFIG] [--set a.b=v ...]
    deepspeed --num_gpus 2 train/main.py --data RUN_A RUN_B --out OUT   (runs routed with one tree: --tree RUN_A)
    torchrun --nproc_per_node 2 train/main.py ...      python train/main.py ...   (one process, for debugging)

One step on rank r: a batch from r's own subtrees (train/data.py) fetches only the blocks on its
paths from r's bank shard; the anchor's gradients go through DeepSpeed (ZeRO), the blocks'
gradients are reduced only among the ranks holding them (train/distributed.py) and only those
blocks are updated (train/optim.py); with data.isolated each of r's level-1 subtrees takes its own step
(docs/DESIGN.md, "Isolated subtrees"). Without --config the demo config is trained. A run resumes
from OUT/checkpoints/latest when there is one; at the end the model is exported to OUT/export.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from index.encoder import cpu_has_bf16
from pipeline.stages import fmt_duration
from train import checkpoint
from train.config import TrainConfig, check_world, load_config
from train.data import IsolatedLoader, ShardLoader, assign_subtrees, nonempty_l1, read_manifests
from train.distributed import BlockReducer, DistInfo, init, teardown
from train.export import anchor_weights, export, write_bank_file
from train.model import Anchor, token_nll
from train.optim import BlockGrads, TouchedAdamW, lr_at


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="configs/train/<name>.yaml or a name in it (default: demo)")
    ap.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="RUN",
        help="run directories of jobs/cluster_corpus.py; several must share one tree_version and tokenizer",
    )
    ap.add_argument("--out", required=True, help="output directory (checkpoints, logs, export)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override (repeatable)"
    )
    ap.add_argument("--deepspeed_config", help="a ds_config JSON to use instead of the generated one")
    ap.add_argument("--no-resume", action="store_true", help="start fresh even if OUT/checkpoints/latest exists")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return ap.parse_args(argv)


def ds_config(cfg: TrainConfig, bf16: bool) -> dict:
    if cfg.deepspeed.config:
        with open(cfg.deepspeed.config) as f:
            user = json.load(f)
        if user.get("train_micro_batch_size_per_gpu", cfg.data.batch_size) != cfg.data.batch_size:
            raise ValueError(
                f"{cfg.deepspeed.config}: train_micro_batch_size_per_gpu differs from data.batch_size "
                f"{cfg.data.batch_size}; the loader makes batches of data.batch_size"
            )
        return user
    generated = cfg.ds_config(bf16)
    if not cfg.recipe.trains_anchor:
        generated["zero_optimization"] = {"stage": 0}  # a frozen anchor has no optimizer state to shard
    return generated


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def build_anchor(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """The anchor (the recipe's init weights loaded) and, when the recipe trains it, its optimizer; a frozen
    anchor gets no optimizer and no gradients."""
    torch.manual_seed(cfg.data.seed)  # the same anchor init on every rank
    if cfg.model.hf:  # a pretrained transformers model behind the anchor's interface (train/hf.py)
        from train.hf import load_base

        anchor = load_base(cfg.model)
    else:
        anchor = Anchor(cfg.model)
    if cfg.recipe.init_anchor:
        anchor.load_state_dict(load_file(os.path.join(cfg.recipe.init_anchor, "anchor.safetensors")))
    if not cfg.recipe.trains_anchor:
        anchor.requires_grad_(False)
        return anchor, None
    decay = [p for p in anchor.parameters() if p.dim() >= 2]  # matrices decay; norms do not
    rest = [p for p in anchor.parameters() if p.dim() < 2]
    a = cfg.optim.anchor
    # plain torch AdamW as DeepSpeed's client optimizer: no fused_adam op to compile. "step" in each group: ZeRO's
    # elastic checkpoint (another world size on resume) records it there; torch keeps its own per parameter.
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return anchor, torch.optim.AdamW(
        [{**g, "step": 0} for g in groups], lr=a.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )


class Trainer:
    def __init__(
        self, cfg: TrainConfig, run_dirs: list[str], out_dir: str, dist_info: DistInfo, manifest: dict, resume: bool
    ):
        import deepspeed

        self.cfg, self.out_dir, self.manifest = cfg, out_dir, manifest
        self.rank, self.world, self.device = dist_info.rank, dist_info.world_size, dist_info.device
        self.k, self.depth = int(manifest["k"]), int(manifest["depth"])
        self.ownership = assign_subtrees(manifest, self.world)
        self.loader = self.make_loader(run_dirs)
        # batches of one shape in the whole world per step: one per rank, or one per subtree when isolated
        self.batches_per_step = len(nonempty_l1(manifest)) if cfg.data.isolated else self.world
        if warning := self.loader.mixing():
            print(f"warning: {warning}", file=sys.stderr, flush=True)

        anchor, optimizer = build_anchor(cfg)
        self.bf16 = cfg.deepspeed.bf16 if cfg.deepspeed.bf16 is not None else self.device.type == "cuda"
        # A frozen anchor keeps its fp32 weights (it must stay bit-identical) and runs under bf16 autocast;
        # DeepSpeed's bf16 would cast them. A trained anchor gets DeepSpeed's bf16 (fp32 master weights).
        self.autocast = self.bf16 and not cfg.recipe.trains_anchor
        if self.autocast and self.device.type == "cpu" and not cpu_has_bf16():
            print(
                "warning: deepspeed.bf16 on a CPU without native bf16 (AVX512-BF16 or AMX): autocast runs many "
                "times slower than fp32 here; leave deepspeed.bf16 unset",
                file=sys.stderr,
                flush=True,
            )
        ds_bf16 = self.bf16 and not self.autocast
        self.engine, *_ = deepspeed.initialize(model=anchor, optimizer=optimizer, config=ds_config(cfg, ds_bf16))

        self.bank = self.mem_optim = self.reducer = None
        if cfg.recipe.uses_memory:
            self.build_bank()

        self.step, self.tokens_seen = 0, 0
        self.ckpt_root = os.path.join(out_dir, "checkpoints")
        last = checkpoint.latest(self.ckpt_root) if resume else None
        if last:
            self.resume_from(last)
        self.open_logs("a" if last else "w")  # a resumed run appends (replayed steps log again; the last line wins)
        self.describe()

    def make_loader(self, run_dirs: list[str]):
        """This rank's ShardLoader, or with data.isolated one stream per level-1 subtree it owns."""
        d = self.cfg.data
        if d.isolated:
            subtrees = nonempty_l1(self.manifest)
            return IsolatedLoader(run_dirs, self.ownership, self.rank, subtrees, d.batch_size, d.seed, d.shuffle_buffer)
        p_generic = self.cfg.memory.p_generic if self.cfg.recipe.uses_memory else 0.0
        return ShardLoader(run_dirs, self.ownership, self.rank, d.batch_size, d.seed, p_generic, d.shuffle_buffer)

    def build_bank(self) -> None:
        """This rank's bank shard, the touched-block AdamW that updates it and the reducer of its blocks'
        gradients. The bank lives outside ZeRO: this rank's blocks only."""
        from train.memory import MemoryBank

        cfg, mem = self.cfg, self.cfg.memory
        owned = torch.from_numpy(self.ownership.blocks(self.rank))
        if mem.store == "disk":  # blocks + moments in files under a RAM budget, read ahead of the steps
            from train.prefetch import Prefetcher
            from train.store_disk import DiskBlockStore

            store = DiskBlockStore.create(
                mem,
                cfg.model,
                owned,
                os.path.join(self.out_dir, "bank_store", f"rank{self.rank}"),
                int(mem.ram_budget_mb * 2**20),
                state=TouchedAdamW.STATE,
            )
            self.bank = MemoryBank(mem, cfg.model.n_layers, cfg.model.d_model, store)
            self.loader = Prefetcher(self.loader, store, mem.prefetch_batches)
        else:
            self.bank = MemoryBank.create(mem, cfg.model, owned, device=self.device)
        if cfg.recipe.init_memory:
            self.load_init_memory(cfg.recipe.init_memory)
        m = cfg.optim.memory
        self.mem_optim = TouchedAdamW(
            self.bank.store, self.k, self.depth, cfg.optim.betas, cfg.optim.eps, m.weight_decay
        )
        self.reducer = BlockReducer(self.ownership, self.rank, self.device, self.bank.store.shapes)

    def load_init_memory(self, export: str) -> None:
        """recipe.init_memory: this rank's blocks from an export's bank (same tree and memory shapes), read
        lazily, level by level; the moments start at zero."""
        from train.export import read_meta
        from train.lazy_store import LazyBlockStore

        meta = read_meta(export)
        if meta["tree_version"] != self.manifest["tree_version"] or meta["memory"] is None:
            raise ValueError(
                f"recipe.init_memory {export}: a model with memory on tree {meta['tree_version']} is needed, the run "
                f"has tree {self.manifest['tree_version']}"
            )
        src = LazyBlockStore([os.path.join(export, f) for f in sorted(meta["bank_files"])])
        store = self.bank.store
        for level, ids in store.ids.items():
            if not len(ids):
                continue
            if src.shapes.get(level) != store.shapes[level]:
                raise ValueError(
                    f"recipe.init_memory {export}: level {level} blocks differ in shape from this config's"
                )
            store.write(level, torch.as_tensor(ids), src.read(level, torch.as_tensor(ids)))

    def resume_from(self, last: str) -> None:
        """The engine, this rank's blocks and moments, the loader's position and the counters from checkpoint
        ``last``."""
        state = checkpoint.load(
            last,
            self.engine,
            self.rank,
            self.world,
            self.cfg.recipe.trains_anchor,
            self.bank and self.bank.store,
            self.mem_optim,
            self.k,
            self.depth,
        )
        if "elastic" in state["loader"]:  # written by another number of ranks: their subtrees were others
            old = state["loader"]["elastic"]
            self.loader.resume(assign_subtrees(self.manifest, len(old)), old)
            self.log(f"{last} was written by {len(old)} ranks; blocks and loader positions regathered for {self.world}")
        else:
            self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.log(f"resumed from {last} at step {self.step}")

    def open_logs(self, mode: str) -> None:
        """Rank 0: metrics.jsonl, config.json and TensorBoard; every rank: its batch log when
        schedule.log_batches. ``mode``: "a" to append to a resumed run's logs, "w" to start them."""
        out_dir = self.out_dir
        self.writer = None
        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            open(os.path.join(out_dir, "metrics.jsonl"), mode).close()
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(self.cfg.to_dict(), f, indent=2)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
        self.batch_log = None
        if self.cfg.schedule.log_batches:
            os.makedirs(os.path.join(out_dir, "batches"), exist_ok=True)
            self.batch_log = open(os.path.join(out_dir, "batches", f"rank{self.rank}.jsonl"), mode)

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def bank_bytes(self) -> int:
        """Bytes of this rank's bank shard and its optimizer state."""
        if self.bank is None:
            return 0
        return self.bank.store.nbytes() + self.mem_optim.state_bytes()

    def precision(self) -> str:
        return "bf16 autocast, fp32 weights" if self.autocast else "bf16" if self.bf16 else "fp32"

    def describe(self) -> None:
        o = self.ownership
        line = (
            f"rank {self.rank}: level-{o.level} subtrees {list(o.subtrees[self.rank])}, {human(o.tokens[self.rank])} "
            "tokens, "
            f"{len(self.loader)} sequences, {len(o.blocks(self.rank))} blocks, bank shard {human(self.bank_bytes())}B"
        )
        lines = [None] * self.world
        dist.all_gather_object(lines, line)
        self.log("\n".join(lines))
        self.log(
            f"recipe {self.cfg.recipe.name}, anchor {human(self.cfg.model.num_params())} params, "
            f"ZeRO stage {self.engine.zero_optimization_stage()}, {self.precision()}, {self.world} "
            f"ranks on {self.device.type}"
        )

    def log_batch(self, step: int, batch) -> None:
        """One line of this rank's batch log (schedule.log_batches): which sequences step ``step`` trained on,
        from which runs, and which went with the generic block."""
        self.batch_log.write(
            json.dumps(
                {
                    "step": step,
                    "seq_ids": batch.seq_ids.tolist(),
                    "runs": batch.runs.tolist(),
                    "generic": batch.generic.tolist(),
                }
            )
            + "\n"
        )
        self.batch_log.flush()

    def update_memory(self, fetched, lr_memory: float) -> tuple[int, float]:
        """The fetched blocks' gradients reduced among the ranks holding them, clipped and applied; returns the
        blocks updated and the memory gradient norm."""
        first = self.cfg.recipe.memory_from_level
        local = [
            BlockGrads(l + 1, ids, {n: t.grad.float() for n, t in named.items()})
            for l, (ids, named) in enumerate(zip(fetched.ids, fetched.params))
            if named and l + 1 >= first
        ]
        isolated = self.cfg.data.isolated
        # isolated: a subtree's blocks are on no other rank and its loss is its own: no reduction, its own norm
        updates = local if isolated else self.reducer.reduce(local)
        mem_norm = self.reducer.clip(updates, self.cfg.optim.grad_clip, local=isolated)
        self.mem_optim.step(updates, lr_memory)
        return sum(len(u.ids) for u in updates), mem_norm

    def loss_per_l1(self, batch, ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This step's token loss and token count per level-1 subtree (float64 [2, k]), for the loss_l1 report."""
        l1 = batch.paths[:, 0].to(self.device)
        per_l1 = torch.zeros(2, self.k, dtype=torch.float64, device=self.device)
        per_l1[0].index_add_(0, l1, ce.sum(1).detach().double())
        per_l1[1].index_add_(0, l1, mask.sum(1).double())
        return per_l1

    def forward(self, batch) -> tuple:
        """(the fetched blocks, the masked token losses [B, T], the mask, the mean loss) of one batch."""
        tokens = batch.tokens.to(self.device)
        mask = batch.mask.to(self.device)
        fetched = self.bank.fetch(batch.block_ids, device=self.device) if self.bank else None
        # A frozen anchor runs as the bare module: DeepSpeed's forward arms a hook that refuses a backward
        # not driven by engine.backward, which needs an optimizer the frozen anchor does not have.
        model = self.engine if self.cfg.recipe.trains_anchor else self.engine.module
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = model(tokens[:, :-1], fetched)
        ce = token_nll(logits, tokens[:, 1:]) * mask
        return fetched, ce, mask, ce.sum() / mask.sum().clamp(min=1)

    def train_step(self) -> dict:
        """One optimizer step; returns this rank's raw statistics."""
        cfg, step = self.cfg, self.step + 1
        if cfg.data.isolated:
            return self.isolated_step(step)
        batch = self.loader.next_batch()
        if self.batch_log:
            self.log_batch(step, batch)
        fetched, ce, mask, loss = self.forward(batch)
        lr_anchor = self.lr("anchor", step)
        lr_memory = self.lr("memory", step)
        if cfg.recipe.trains_anchor:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_anchor
            self.engine.backward(loss)
        else:
            loss.backward()  # gradients reach the fetched blocks only
        touched, mem_norm = 0, 0.0
        if fetched is not None:
            touched, mem_norm = self.update_memory(fetched, lr_memory)
        if cfg.recipe.trains_anchor:
            self.engine.step()
        self.step = step
        return {
            "per_l1": self.loss_per_l1(batch, ce, mask),
            "tokens": mask.numel(),
            "batches": 1,
            "touched": touched,
            "mem_norm": mem_norm,
            "lr_anchor": lr_anchor if cfg.recipe.trains_anchor else 0.0,
            "lr_memory": lr_memory if self.bank else 0.0,
        }

    def isolated_step(self, step: int) -> dict:
        """data.isolated: each of this rank's level-1 subtrees its own batch, forward, backward, gradient norm
        and update, as if it trained alone (frozen anchor, blocks of no other subtree, no generic memory)."""
        lr_memory = self.lr("memory", step)
        per_l1, touched, norms = 0, 0, []
        for batch in self.loader.next_batches():
            if self.batch_log:
                self.log_batch(step, batch)
            fetched, ce, mask, loss = self.forward(batch)
            loss.backward()
            n, norm = self.update_memory(fetched, lr_memory)
            per_l1, touched = per_l1 + self.loss_per_l1(batch, ce, mask), touched + n
            norms.append(norm)
        self.step = step
        return {
            "per_l1": per_l1,
            "tokens": len(norms) * mask.numel(),
            "batches": len(norms),
            "touched": touched,
            "mem_norm": max(norms),  # the largest of this rank's subtrees' own norms
            "lr_anchor": 0.0,
            "lr_memory": lr_memory,
        }

    def lr(self, group: str, step: int) -> float:
        g = getattr(self.cfg.optim, group)
        return lr_at(step, g.lr, self.cfg.schedule.max_steps, g.warmup_steps, g.decay, g.min_lr_ratio)

    def fit(self) -> None:
        sched = self.cfg.schedule

        def new_window() -> dict:  # what the next report averages over
            return {"t": time.time(), "tokens": 0, "steps": 0, "per_l1": 0, "touched": 0}

        window = new_window()
        t_start, start_step = time.time(), self.step
        while self.step < sched.max_steps:
            stats = self.train_step()
            self.tokens_seen += stats["tokens"] // stats["batches"] * self.batches_per_step  # batches of one shape
            window["tokens"] += stats["tokens"]
            window["steps"] += 1
            window["per_l1"] = window["per_l1"] + stats["per_l1"]
            window["touched"] += stats["touched"]
            if self.step % sched.log_every == 0 or self.step == sched.max_steps:
                self.report(stats, window, (time.time() - t_start) / (self.step - start_step))
                window = new_window()
            if (sched.checkpoint_every and self.step % sched.checkpoint_every == 0) or (
                sched.save and self.step == sched.max_steps
            ):
                self.save()

    def reduce_window(self, window: dict) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
        """The window's sums over all ranks in one small all-reduce (every rank takes part): loss and token
        count per level-1 subtree, tokens, blocks touched and bank bytes."""
        vec = torch.cat(
            [
                window["per_l1"].flatten(),
                torch.tensor(
                    [window["tokens"], window["touched"], self.bank_bytes()], dtype=torch.float64, device=self.device
                ),
            ]
        )
        dist.all_reduce(vec)
        k = self.k
        tokens, touched, bank_bytes = (float(x) for x in vec[2 * k :])
        return vec[:k], vec[k : 2 * k], tokens, touched, bank_bytes

    def write_metrics(self, m: dict) -> None:
        """Rank 0: a report's line of metrics.jsonl and its TensorBoard scalars."""
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        for key in (
            "loss",
            "tokens_per_s",
            "lr_anchor",
            "lr_memory",
            "blocks_touched_per_step",
            "bank_bytes_resident",
            "memory_grad_norm",
        ):
            self.writer.add_scalar(f"train/{key}", m[key], self.step)
        for i, v in enumerate(m["loss_l1"]):
            if v is not None:
                self.writer.add_scalar(f"loss_l1/{i}", v, self.step)

    def report(self, stats: dict, window: dict, step_time: float) -> None:
        """Global statistics over the window since the last report (one small all-reduce)."""
        loss_sum, count, tokens, touched, bank_bytes = self.reduce_window(window)
        if self.rank != 0:
            return
        elapsed = time.time() - window["t"]
        # blocks touched: updated per step summed over ranks; bank bytes: all shards + their AdamW state
        m = {
            "step": self.step,
            "loss": float(loss_sum.sum() / count.sum().clamp(min=1)),
            "loss_l1": [float(s / c) if c > 0 else None for s, c in zip(loss_sum, count)],
            "tokens_per_s": tokens / elapsed,
            "tokens_seen": self.tokens_seen,
            "lr_anchor": stats["lr_anchor"],
            "lr_memory": stats["lr_memory"],
            "blocks_touched_per_step": touched / window["steps"],
            "bank_bytes_resident": bank_bytes,
            "memory_grad_norm": stats["mem_norm"],
        }
        self.write_metrics(m)
        eta = fmt_duration(step_time * (self.cfg.schedule.max_steps - self.step))
        print(
            f"step {self.step}/{self.cfg.schedule.max_steps} | loss {m['loss']:.4f} | {human(m['tokens_per_s'])} "
            "tok/s | "
            f"lr {stats['lr_anchor']:.2e}/{stats['lr_memory']:.2e} | blocks/step {m['blocks_touched_per_step']:.1f} | "
            f"bank {human(bank_bytes)}B | eta {eta}",
            flush=True,
        )

    def save(self) -> str:
        path = checkpoint.save(
            self.ckpt_root,
            self.step,
            self.engine,
            self.rank,
            {"loader": self.loader.state_dict(), "tokens_seen": self.tokens_seen, "world_size": self.world},
            self.bank and self.bank.store,
            self.mem_optim,
        )
        self.log(f"checkpoint {path}")
        return path

    def close(self) -> None:
        if hasattr(self.loader, "close"):  # the disk store's prefetch thread
            self.loader.close()
        if self.writer:
            self.writer.close()
        if self.batch_log:
            self.batch_log.close()


def fail(e: Exception) -> None:
    """A user's input or config error: one line, from the launch's rank 0 only (every rank meets the same one)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # before any process group starts: a bad --data or --set costs no launch
        manifest = read_manifests(args.data)
        cfg = load_config(args.config, args.set, manifest)
        check_world(cfg, manifest, int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    info = init()
    if args.deepspeed_config:
        cfg.deepspeed.config = args.deepspeed_config
    trainer = Trainer(cfg, args.data, args.out, info, manifest, resume=not args.no_resume)
    trainer.fit()
    # this step's checkpoint, not `latest`: rank 0 may not have moved `latest` yet when another rank reads it
    last = os.path.join(trainer.ckpt_root, checkpoint.tag_for(trainer.step))
    if cfg.schedule.save:  # each rank exports its own bank file from its own shard: no gather (train/export.py)
        out = os.path.join(args.out, "export")
        if trainer.bank:
            write_bank_file(last, info.rank, out, trainer.ownership)
        if info.rank == 0:
            export(
                last, args.data[0], out, cfg.to_dict(), anchor_weights(last, cfg.to_dict()), manifest, trainer.ownership
            )
        dist.barrier()  # the run ends when every rank's file is written
        trainer.log(f"exported {out}")
    trainer.close()
    teardown()


if __name__ == "__main__":
    main()
