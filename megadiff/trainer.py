"""The generic training loop. Objectives (mixins in `megadiff/objectives/`) supply the
networks, which of them step on an iteration, and the loss terms; this class builds the
engines, data, logging and checkpointing around them and runs the loop."""
from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megadiff import flops, sampling
from megadiff.config import RunConfig
from megadiff.data.dataset import make_train_loader, read_shard_info
from megadiff.engine import checkpoint
from megadiff.engine.dist_env import setup_dist_env
from megadiff.engine.ds_config import build_ds_config
from megadiff.engine.engines import build_engine, build_frozen
from megadiff.engine.run_dir import RunDir
from megadiff.errors import RunStopped
from megadiff.logger import MetricsLogger, device_peak_tflops, memory_mb, progress_bar
from megadiff.models import sd3
from megadiff.objectives.base import NetSpec, Objective
from megadiff import validation


class BaseTrainer(Objective):
    def __init__(self, cfg: RunConfig, output_dir: str | Path, resume: bool = False):
        self.cfg = cfg
        self.run = RunDir(output_dir)
        self.dist_env = setup_dist_env()
        self.rank, self.world_size = self.dist_env.rank, self.dist_env.world_size
        self.global_batch = cfg.check_batch(self.world_size)
        if cfg.demo.enabled:           # the demo's paths are part of the run's identity
            self._use_demo_paths()
        self.resuming = self.run.check_can_start(cfg.to_dict(), resume)
        if not cfg.demo.enabled:       # fail on bad paths before any process group exists
            self._check_inputs()
        self._init_distributed()
        if cfg.demo.enabled:
            self._prepare_demo()
            self._check_inputs()
        if self.rank == 0:
            self.run.make()
            self.run.args.write_text(json.dumps(cfg.to_dict(), indent=1))
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        self.noise_rng = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.device = torch.device(_device_name())
        self.ds_config = build_ds_config(cfg, self.world_size, _device_supports_fp16())
        if self.resuming and checkpoint.saved_world_size(self.run) != self.world_size:
            self.ds_config["checkpoint"] = {"load_universal": True}   # elastic resume
        self.compute_dtype = sd3.DTYPES[cfg.model.precision]
        self._metrics: dict[str, float] = {}
        self.specs = self.networks()
        self.engines: dict[str, object] = {}
        self.trainable_params: dict[str, list[str]] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        for name, spec in self.specs.items():
            module = self.build_network(name, spec)
            if spec.trainable:
                # the optimizer's parameter order (ZeRO-0 checkpoints keep fp32 masters in it)
                self.trainable_params[name] = [n for n, p in module.named_parameters() if p.requires_grad]
                self.engines[name] = build_engine(module, self.ds_config, cfg.optim_for(name),
                                                  cfg.train.max_steps)
            else:
                self.frozen[name] = build_frozen(module, self.ds_config, self.device, self.compute_dtype)
        self.build_extras()
        self.loader = make_train_loader(cfg.data, cfg.seed)
        self._data_iter = None
        self._sample_log: list | None = [] if cfg.train.log_samples else None
        self.step, self.consumed_samples, self.skipped, self.consecutive_nonfinite = 0, 0, 0, 0
        self.consecutive_bad_grads = 0
        if self.resuming:
            self._resume()
        self.logger = MetricsLogger(self.run.loss_logs, self.run.log, cfg.to_dict(), self.rank,
                                    cfg.logging.wandb_mode, cfg.logging.wandb_project,
                                    self.run.root.name)
        self.val_embeds = validation.prompt_embeddings(self, cfg.validation.prompts)

    # ---- construction ---------------------------------------------------------------------
    def _init_distributed(self) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # Each rank's device must be set before anything (frozen nets, batches) is placed on it;
        # deepspeed.initialize would set it only later, leaving every rank on device 0.
        if get_accelerator().device_name() != "cpu":
            local, visible = self.dist_env.local_rank, get_accelerator().device_count()
            if local >= visible:
                raise ValueError(f"local rank {local} but this process sees {visible} GPU(s): launch so that "
                                 "every rank sees all of its node's GPUs (e.g. srun --gpu-bind=none, no "
                                 "per-task CUDA_VISIBLE_DEVICES); megadiff picks the GPU by local rank")
            get_accelerator().set_device(local)
        if not dist.is_initialized():
            deepspeed.init_distributed(verbose=False,
                                       timeout=timedelta(minutes=self.cfg.train.dist_timeout_minutes))

    def _prepare_demo(self) -> None:
        """Tiny model + synthetic shards under output_dir/demo (rank 0 builds, others wait)."""
        from megadiff.data.synthetic import shape_samples
        from megadiff.data.writer import write_train_shards
        from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH, make_tiny_sd3

        model_dir, shard_dir = Path(self.cfg.model.path), Path(self.cfg.data.local)
        if self.rank == 0:
            if not (model_dir / "model_index.json").is_file():
                _clear(model_dir)
                make_tiny_sd3(model_dir, seed=self.cfg.seed)
            if self.cfg.context.enabled and not (shard_dir / "index.json").is_file():
                from megadiff.models.context_train import write_demo_shards   # long captions + context
                write_demo_shards(shard_dir, model_dir, self.cfg, TINY_T5_MAX_LENGTH)
            if not (shard_dir / "index.json").is_file():
                write_train_shards(shard_dir, shape_samples(self.cfg.demo.num_samples, TINY_RESOLUTION,
                                                            self.cfg.seed),
                                   model_dir, TINY_RESOLUTION, TINY_T5_MAX_LENGTH, seed=self.cfg.seed)
        _barrier()

    def _use_demo_paths(self) -> None:
        from megadiff.models.tiny import TINY_T5_MAX_LENGTH

        demo = self.run.root / "demo"
        self.cfg.model.path = str(demo / "model")
        self.cfg.model.max_sequence_length = TINY_T5_MAX_LENGTH
        self.cfg.data.local, self.cfg.data.remote = str(demo / "shards"), None

    def _check_inputs(self) -> None:
        self.model_path = sd3.check_sd3_dir(self.cfg.model.path)
        self.transformer_config = sd3.transformer_config(self.model_path)
        self.shards = read_shard_info(self.cfg.data)
        self._check_shards_fit_model()

    def _check_shards_fit_model(self) -> None:
        if self.shards is None:
            return
        info = self.shards
        where = self.cfg.data.remote or self.cfg.data.local
        if info.schema not in ("megadiff.train", "megadiff.train_context"):
            raise ValueError(f"shards in {where} are a {info.schema} set, but this recipe trains on "
                             "image latents (megadiff.train): point data.local at shards built with "
                             "`megadiff data build`")
        self._check_shard_geometry(info, where)
        if self.cfg.context.enabled:
            from megadiff.models.context_train import check_shards

            check_shards(self.cfg, info, where)

    def _check_shard_geometry(self, info, where: str) -> None:
        """Latents and text embeddings of `info` fit the transformer (any schema that has them)."""
        tc = self.transformer_config
        c, h, w = info.latent_shape
        problems = []
        if c != tc["in_channels"]:
            problems.append(f"latents have {c} channels, the transformer takes {tc['in_channels']}")
        p, max_patches = tc["patch_size"], tc.get("pos_embed_max_size") or 0
        if h % p or w % p:
            problems.append(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        elif max_patches and max(h, w) // p > max_patches:
            problems.append(f"latent size {h}x{w} exceeds the transformer's position grid "
                            f"({max_patches * p} latent pixels)")
        if info.text_dim != tc["joint_attention_dim"]:
            problems.append(f"text embeddings are {info.text_dim}-wide, the transformer takes "
                            f"{tc['joint_attention_dim']}")
        if info.pooled_dim != tc["pooled_projection_dim"]:
            problems.append(f"pooled embeddings are {info.pooled_dim}-wide, the transformer takes "
                            f"{tc['pooled_projection_dim']}")
        if problems:
            raise ValueError(f"shards in {where} do not fit {self.model_path}: {problems[0]}; "
                             "rebuild the shards with this model (`megadiff data build --model ...`)")

    def build_network(self, name: str, spec: NetSpec) -> torch.nn.Module:
        """Load a network's weights; objectives with other sources override this."""
        if spec.init != "model":
            raise ValueError(f"network {name!r} wants init={spec.init!r}, which no objective builds")
        # Loaded in fp32: DeepSpeed keeps fp32 master weights and casts the module for bf16.
        module = sd3.load_transformer(self.model_path, torch.float32)
        if self.cfg.model.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        if self.cfg.context.enabled:   # transformer + context projector: one engine, one checkpoint
            from megadiff.models.context_train import wrap_transformer

            module = wrap_transformer(self.cfg, self.model_path, module)
        return module

    # ---- the pieces objectives call --------------------------------------------------------
    def forward_net(self, net: str, x_t: torch.Tensor, sigma: torch.Tensor, batch: dict,
                    prompt_embeds: torch.Tensor | None = None, pooled: torch.Tensor | None = None):
        """Velocity prediction of network `net` at noise level `sigma` (fp32 out)."""
        module = self.engines.get(net) or self.frozen[net]
        dt = self.compute_dtype
        emb = batch["prompt_embeds"] if prompt_embeds is None else prompt_embeds
        pool = batch["pooled_prompt_embeds"] if pooled is None else pooled
        extra = {}
        if self.cfg.context.enabled and prompt_embeds is None:   # the batch's own long-prompt context
            from megadiff.models.context_train import batch_context

            extra["context"] = batch_context(batch, self.device, dt)
        out = module(hidden_states=x_t.to(self.device, dt), encoder_hidden_states=emb.to(self.device, dt),
                     pooled_projections=pool.to(self.device, dt),
                     timestep=(sigma * 1000).to(self.device, torch.float32), return_dict=False, **extra)[0]
        return out.float()

    def record_metric(self, name: str, value) -> None:
        """A logged-only value of the current micro-batch (never back-propagated), logged as
        `metric/<name>` and averaged over the micro-steps that recorded it, like a loss term."""
        self._metrics[name] = float(value)

    def next_batch(self) -> dict:
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        try:
            batch = next(self._data_iter)
        except StopIteration:          # next epoch
            self._data_iter = iter(self.loader)
            batch = next(self._data_iter)
        if self._sample_log is not None:
            self._sample_log.append(batch["sample_index"].tolist())
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _write_sample_log(self) -> None:
        """`loss_logs/samples-rank{r}.jsonl`: which samples this rank consumed at each step."""
        path = self.run.loss_logs / f"samples-rank{self.rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"iteration": self.step, "indices": self._sample_log}) + "\n")
        self._sample_log = []

    def flops_per_iteration(self) -> float:
        """Model FLOPs one rank spends per iteration (MMDiT forward+backward per sample)."""
        if self.shards is None:
            return 0.0
        _, h, w = self.shards.latent_shape
        per_sample = flops.model_flops_per_sample(self.transformer_config, h, w, self.shards.text_seq_len,
                                                  self.cfg.model.gradient_checkpointing)
        nets = len(self.steps_this_iteration(self.step))
        return per_sample * nets * self.cfg.data.micro_batch_size * self.cfg.data.gradient_accumulation_steps

    def samples_per_iteration(self, step: int) -> int:
        """Samples iteration `step` takes from the data (the `consumed samples` count)."""
        return self.global_batch

    def sample_latents(self, noise: torch.Tensor, embeds: dict) -> torch.Tensor:
        """Validation sampling; objectives with a few-step generator override this."""
        v = self.cfg.validation
        net = self.engines["transformer"]
        if self.cfg.context.enabled:   # append the validation prompts' long-prompt context
            from megadiff.models.context_train import with_validation_context

            net = with_validation_context(self, net, embeds)
        return sampling.euler_sample(
            net, noise.to(self.device), embeds["embeds"], embeds["pooled"],
            v.num_inference_steps, self.cfg.flow.shift, v.guidance_scale,
            embeds["neg_embeds"].expand_as(embeds["embeds"]),
            embeds["neg_pooled"].expand_as(embeds["pooled"]), self.compute_dtype)

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg.train
        if self.rank == 0:
            self.logger.text(f"training {'+'.join(self.cfg.objectives)} on {self.world_size} rank(s), "
                             f"global batch {self.global_batch}, from step {self.step} to {cfg.max_steps}")
        bar = progress_bar(cfg.max_steps, self.step, self.cfg.logging.progress, self.rank)
        acc: dict[str, list] = {}          # loss term -> [sum, micro-steps]
        grad_norms: dict[str, float] = {}
        n_acc, t_interval = 0, time.perf_counter()
        peak = device_peak_tflops(self.cfg.logging.peak_tflops)
        while self.step < cfg.max_steps:
            for net in self.steps_this_iteration(self.step):
                grad_norms[f"grad_norm/{net}"] = self._step_network(net, acc)
            self.consumed_samples += self.samples_per_iteration(self.step)
            self.step += 1
            if self._sample_log is not None:
                self._write_sample_log()
            n_acc += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t_interval
                self._log(acc, n_acc, grad_norms, elapsed, peak)
                acc, n_acc, t_interval = {}, 0, time.perf_counter()
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save()
            if cfg.sample_interval and self.step % cfg.sample_interval == 0 and self.step != cfg.max_steps:
                validation.write_samples(self)
        if bar is not None:
            bar.close()
        validation.write_samples(self)
        self.logger.close()
        self._release_shm()

    def _step_network(self, net: str, acc: dict) -> float:
        """One optimizer step of `net` over `gradient_accumulation_steps` micro-batches.

        A micro-batch whose loss is NaN/Inf on any rank is skipped on every rank before its
        backward (so no bad gradient reaches the weights) and counted; after
        `train.max_consecutive_nonfinite` in a row the run saves the last good state and stops.
        """
        engine = self.engines[net]
        accumulation = self.cfg.data.gradient_accumulation_steps
        done, skipped_before = 0, engine.skipped_steps
        while done < accumulation:
            terms = self.loss_terms(net, self.next_batch(), self.step)
            metrics, self._metrics = self._metrics, {}
            assert terms, f"no loss terms for network {net} at step {self.step}"
            loss = sum(terms.values())
            if not self._finite_on_all_ranks(loss):
                self._skip_nonfinite(net, terms)
                continue
            self.consecutive_nonfinite = 0
            engine.backward(loss)
            engine.step()
            done += 1
            for k, v in terms.items():      # [sum, count] per term: terms of nets that step
                total = acc.setdefault(f"loss/{k}", [0.0, 0])   # less often average correctly
                total[0] += float(v.detach())
                total[1] += 1
            for k, v in metrics.items():
                total = acc.setdefault(f"metric/{k}", [0.0, 0])
                total[0] += v
                total[1] += 1
        norm = engine.get_global_grad_norm()
        if norm is None:                 # DeepSpeed keeps no norm for ZeRO-0 with fp32
            return float("nan")
        norm = float(norm)
        if math.isfinite(norm):
            self.consecutive_bad_grads = 0
            return norm
        if engine.skipped_steps == skipped_before:     # the update went through (ZeRO-0)
            raise RunStopped(f"network {net} got a non-finite gradient norm at iteration {self.step + 1} "
                             f"and ZeRO stage 0 applied it; nothing was saved: resume from "
                             f"{self.run.latest} with a lower optim.lr or optim.grad_clip")
        self._skip_bad_gradient(net)
        return norm

    def _skip_bad_gradient(self, net: str) -> None:
        """ZeRO stages 1-3 discard an optimizer step whose gradient norm is NaN/Inf (DeepSpeed's
        overflow check, counted in `engine.skipped_steps`): the weights are still the last good
        ones. Count it; after `train.max_consecutive_nonfinite` in a row save them and stop."""
        self.consecutive_bad_grads += 1
        self.logger.text(f"skipped the optimizer step of {net} at iteration {self.step + 1}: non-finite "
                         f"gradient norm ({self.consecutive_bad_grads} in a row)")
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.consecutive_bad_grads >= limit:
            tag = self.save()
            raise RunStopped(f"{limit} optimizer steps in a row had a non-finite gradient at iteration "
                             f"{self.step + 1}; the last good state is saved as {tag}: lower optim.lr "
                             "or optim.grad_clip, then --resume auto")

    def _finite_on_all_ranks(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).all().float().reshape(1).to(self.device)  # NCCL: no CPU tensors
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _skip_nonfinite(self, net: str, terms: dict) -> None:
        self.skipped += 1
        self.consecutive_nonfinite += 1
        bad = ", ".join(k for k, v in terms.items() if not torch.isfinite(v.detach()).all())
        self.logger.text(f"skipped a micro-batch of {net} at iteration {self.step + 1}: non-finite "
                         f"{bad or 'loss on another rank'} ({self.skipped} skipped so far)")
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.consecutive_nonfinite >= limit:
            tag = self.save()
            raise RunStopped(f"{limit} micro-batches in a row had a non-finite loss at iteration "
                             f"{self.step + 1}; the last good state is saved as {tag}: check the "
                             "shards (`megadiff data verify`) or lower optim.lr, then --resume auto")

    def _release_shm(self) -> None:
        """DeepSpeed's CPU shm all-reduce never unlinks its ~66 MB /dev/shm buffer; once every
        rank is done with the others' buffers, each removes its own name (the mapping lives on)."""
        _barrier()
        name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{self.dist_env.master_addr}_"
                f"{self.dist_env.master_port}_{self.rank}")
        Path("/dev/shm", name).unlink(missing_ok=True)

    def _log(self, acc: dict, n: int, grad_norms: dict, elapsed: float, peak: float | None) -> None:
        keys = sorted(acc)
        vals = torch.tensor([acc[k][0] / acc[k][1] for k in keys], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(vals)
            vals /= self.world_size
        ms = 1000 * elapsed / n
        tflops = self.flops_per_iteration() / (ms / 1000) / 1e12
        rec = {"iteration": self.step, "max_steps": self.cfg.train.max_steps,
               "consumed_samples": self.consumed_samples, "ms_per_iteration": ms}
        rec |= {f"lr/{name}": e.get_lr()[0] for name, e in self.engines.items()}
        rec |= dict(zip(keys, vals.tolist())) | grad_norms
        skipped = self.skipped + sum(e.skipped_steps for e in self.engines.values())
        rec |= {"skipped_iterations": skipped, "tflops_per_device": tflops,
                "mfu": tflops / peak if peak else None, "memory_mb": memory_mb()}
        if any(not math.isfinite(v) for k, v in rec.items() if k.startswith("loss/")):
            rec["nonfinite_loss"] = True
        self.logger.log(rec)

    # ---- checkpoints -----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed_samples,
                "skipped": self.skipped, "world_size": self.world_size,
                "global_batch": self.global_batch, "networks": sorted(self.engines),
                "trainable_params": self.trainable_params, "data": self.loader.state_dict()}

    def save(self) -> str:
        rank_state = checkpoint.capture_rng(self.noise_rng) | {"objective": self.rank_state()}
        tag = checkpoint.save(self.run, self.engines, self.trainer_state(), rank_state, self.rank,
                              self.cfg.train.keep_last)
        self.logger.text(f"saved checkpoint {self.run.tag_dir(tag)}")
        return tag

    def _resume(self) -> None:
        state, rng = checkpoint.load(self.run, self.engines, self.rank, self.world_size)
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"the checkpoint was trained with global batch {state['global_batch']}, "
                             f"this run has {self.global_batch}: keep the global batch when resuming")
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]
        self.skipped = state["skipped"]
        self.loader.load_state_dict(state["data"])
        if rng is not None:
            checkpoint.restore_rng(rng, self.noise_rng)
            self.load_rank_state(rng.get("objective", {}))
        else:   # another rank count: RNG streams cannot carry over, so re-seed by step
            torch.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * self.step)
            self.noise_rng.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * self.step)


def _device_supports_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu" and get_accelerator().is_fp16_supported()


def _device_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _clear(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
