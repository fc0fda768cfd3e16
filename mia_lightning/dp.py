"""DP-SGD for the target model: the ``dp:`` config, the settings it refuses, and the Opacus 1.6 glue.

A DP arm must differ from its non-DP arm in the training algorithm only, so Opacus is attached to the network
without wrapping it (``wrap_model=False``: state dict keys stay those of ``build_model``), and batches come from our
own DataModule's Poisson sampler, because Lightning iterates its own loader, not the one ``make_private`` returns.
The accountant is therefore fed the rate that sampler really uses, not Opacus' ``1 / len(loader)`` guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import lightning as L
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

ACCOUNTANTS = ("prv", "rdp", "gdp")
GRAD_SAMPLE_MODES = ("auto", "ghost", "hooks", "functorch")
# 16-mixed scales the loss, hence every per-example gradient, before Opacus clips it: the bound no longer holds.
DP_PRECISIONS = ("32-true", "bf16-mixed")


@dataclass
class DPConfig:
    """The ``dp:`` section of a target's config.

    Args:
        noise_multiplier: sigma, the noise std in units of ``max_grad_norm``; 0 clips without noise (epsilon inf).
        target_epsilon: instead of sigma: sigma is solved so the planned steps spend exactly this budget.
        delta: default 1/N rounded down to a power of ten (N = number of members).
        max_grad_norm: the per-example clipping bound C.
        accountant: ``prv`` (tightest), ``rdp`` or ``gdp``.
        poisson_sampling: what the accountant assumes; off trains on shuffled fixed-size batches and the reported
            epsilon becomes an approximation.
        grad_sample_mode: ``auto`` picks ghost clipping (per-example gradient norms without per-example gradients)
            unless layers share parameters, which ghost clipping cannot handle; then ``hooks``.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    poisson_sampling: bool = True
    grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "dp needs exactly one of noise_multiplier or target_epsilon, got "
                f"noise_multiplier={self.noise_multiplier} and target_epsilon={self.target_epsilon}"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"dp.noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not 0 < self.target_epsilon < math.inf:
            raise ValueError(f"dp.target_epsilon must be > 0 and finite, got {self.target_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must lie in (0, 1), got {self.delta}")
        if not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"dp.max_grad_norm must be > 0 and finite, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown dp.accountant {self.accountant!r}; available: {', '.join(ACCOUNTANTS)}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"unknown dp.grad_sample_mode {self.grad_sample_mode!r}; available: {', '.join(GRAD_SAMPLE_MODES)}"
            )
        if not isinstance(self.poisson_sampling, bool):
            raise ValueError(f"dp.poisson_sampling must be true or false, got {self.poisson_sampling!r}")


def as_dp_config(value: DPConfig | Mapping[str, Any] | None) -> DPConfig | None:
    """A ``DPConfig`` from itself or a plain mapping (as stored in checkpoint hparams); None means no DP."""
    if value is None or isinstance(value, DPConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"dp must be a mapping of DP settings or null, got {type(value).__name__}")
    known = {f.name for f in fields(DPConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown dp setting(s) {unknown}; valid: {sorted(known)}")
    return DPConfig(**value)


def dp_config_as_dict(config: DPConfig | None) -> dict[str, Any] | None:
    """Plain data: checkpoints are loaded with ``weights_only=True``, which refuses pickled dataclasses."""
    return None if config is None else asdict(config)


def default_delta(num_members: int) -> float:
    """``10 ** -ceil(log10 N)``: 1/N rounded down to a power of ten, computed without floating-point log."""
    if num_members < 2:
        raise ValueError(f"DP-SGD needs at least 2 members, got {num_members}")
    return 10.0 ** -len(str(num_members - 1))


# -- the architecture ----------------------------------------------------------------------------------------------
def fix_for_dp(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Opacus' ``ModuleValidator.fix`` (BatchNorm -> GroupNorm, ...), and the names of the modules it replaced.

    Applied to both arms of a comparison, so the DP and non-DP architectures are the same.
    """
    before = {name: type(module) for name, module in model.named_modules()}
    fixed = ModuleValidator.fix(model)
    replaced = [name for name, module in fixed.named_modules() if name in before and type(module) is not before[name]]
    return fixed, replaced


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse, naming the module, a network whose per-example gradients Opacus cannot compute or bound."""
    for name, module in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(module))
        errors = validator(module) if validator is not None else []
        if errors:
            raise ValueError(f"module {name!r} ({type(module).__name__}) cannot be trained with DP-SGD: {errors[0]}")
        buffers = [buffer_name for buffer_name, _ in module.named_buffers(recurse=False)]
        if buffers:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) has trainable parameters and buffers {buffers}: "
                "buffers are updated from the batch without noise, so DP-SGD cannot train it"
            )


def shares_parameters(model: nn.Module) -> bool:
    return len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters()))


def choose_grad_sample_mode(model: nn.Module, requested: str) -> str:
    """``auto``: ghost clipping unless layers share parameters (Opacus' ghost clipping refuses tied weights)."""
    if requested == "auto":
        return "hooks" if shares_parameters(model) else "ghost"
    if requested == "ghost" and shares_parameters(model):
        raise ValueError("dp.grad_sample_mode 'ghost' cannot train a model whose layers share parameters; use 'hooks'")
    return requested


# -- the trainer and the data -------------------------------------------------------------------------------------
def check_trainer_for_dp(trainer: L.Trainer, config: DPConfig, grad_sample_mode: str) -> None:
    """Refuse trainer settings that would silently void the guarantee or break the run; called before any step.

    ``grad_sample_mode``: the one ``choose_grad_sample_mode`` picked for the model.
    """
    if trainer.gradient_clip_val:
        raise ValueError(
            f"trainer.gradient_clip_val={trainer.gradient_clip_val} does nothing under DP-SGD (Opacus clips each "
            "example's gradient and overwrites the batch gradient): remove it and set dp.max_grad_norm instead"
        )
    if trainer.accumulate_grad_batches > 1:
        reason = (
            "Poisson sampling draws each batch as one step of the sampled Gaussian mechanism"
            if config.poisson_sampling
            else "DP-SGD takes one noisy step per batch and the accountant counts batches as steps"
        )
        raise ValueError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is not supported with DP-SGD: "
            f"{reason}; raise data.batch_size instead"
        )
    if trainer.precision not in DP_PRECISIONS:
        raise ValueError(
            f"trainer.precision={trainer.precision!r} is not allowed with DP-SGD: use one of "
            f"{', '.join(DP_PRECISIONS)} (16-mixed multiplies every per-example gradient by its loss scale before "
            "Opacus clips it)"
        )
    if trainer.precision == "bf16-mixed" and grad_sample_mode != "ghost":
        raise ValueError(
            f"trainer.precision='bf16-mixed' works with ghost clipping only, not dp.grad_sample_mode "
            f"{grad_sample_mode!r}: Opacus 1.6 then stores bfloat16 per-example gradients in float32 parameters "
            "and fails; use precision 32-true"
        )
    if trainer.world_size > 1 or trainer.num_devices > 1:
        raise ValueError(
            f"DP-SGD runs on one device, got {trainer.num_devices} device(s) x {trainer.num_nodes} node(s) "
            f"({type(trainer.strategy).__name__}): replicas of a DP optimizer drift apart silently under "
            "Lightning's DDP; set trainer.devices=1"
        )


def sample_rate_of(loader: DataLoader, poisson_sampling: bool) -> float:
    """The probability that a given member is in a batch, read from the loader that training really iterates."""
    sampler = loader.batch_sampler
    if poisson_sampling:
        if not isinstance(sampler, UniformWithReplacementSampler):
            raise ValueError(
                "dp.poisson_sampling is on but the train loader Lightning iterates does not Poisson-sample "
                f"(its batch sampler is {type(sampler).__name__}): the DataModule must honour poisson_sampling "
                "(MembershipDataModule does), or set dp.poisson_sampling false"
            )
        return float(sampler.sample_rate)
    if loader.batch_size is None:
        raise ValueError("without Poisson sampling the train loader needs a fixed batch_size")
    return loader.batch_size / len(loader.dataset)


def epsilon_of(accountant_name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps); 0 before any step, inf without noise."""
    if not history:
        return 0.0
    if any(noise_multiplier == 0 for noise_multiplier, _, _ in history):
        return math.inf
    accountant = create_accountant(accountant_name)
    accountant.history = [tuple(entry) for entry in history]
    return float(accountant.get_epsilon(delta=delta))


# -- one DP fit ---------------------------------------------------------------------------------------------------
class DPSGD:
    """The Opacus objects of one DP-SGD fit: the optimizer that clips and noises, the criterion to train with, the
    hooks that compute per-example gradients (or their norms), and the accountant.

    Build it with ``attach`` in ``configure_optimizers``; ``state_dict`` is plain data for Lightning checkpoints, and
    ``attach(..., state=...)`` resumes the accounting where the checkpoint left it.
    """

    def __init__(
        self,
        config: DPConfig,
        engine: PrivacyEngine,
        optimizer: DPOptimizer,
        criterion: Callable[..., Any],
        hooks: Any,
        noise_generator: torch.Generator,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        grad_sample_mode: str,
        planned_steps: int | None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.optimizer = optimizer
        self.criterion = criterion
        self.hooks = hooks
        self.noise_generator = noise_generator
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.grad_sample_mode = grad_sample_mode
        self.planned_steps = planned_steps
        self._epsilon_cache: tuple[tuple, float] | None = None

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module,
        train_loader: DataLoader,
        config: DPConfig,
        planned_steps: float,
        state: Mapping[str, Any] | None = None,
    ) -> DPSGD:
        """Make ``model``/``optimizer``/``criterion`` private for training on ``train_loader``.

        ``planned_steps``: the optimizer steps the fit will take (``trainer.estimated_stepping_batches``), which
        ``target_epsilon`` solves sigma for. ``state``: a ``state_dict()`` from the checkpoint being resumed.
        """
        sample_rate = sample_rate_of(train_loader, config.poisson_sampling)
        num_members = len(train_loader.dataset)
        delta = config.delta if config.delta is not None else default_delta(num_members)
        planned = None
        if config.target_epsilon is not None:
            if not math.isfinite(planned_steps):
                raise ValueError(
                    "dp.target_epsilon needs a finite training budget to solve the noise for; "
                    "set trainer.max_epochs or trainer.max_steps"
                )
            planned = int(planned_steps)
        if state is not None:
            noise_multiplier = cls._resume_noise(config, state, planned)
        elif config.target_epsilon is not None:
            noise_multiplier = get_noise_multiplier(
                target_epsilon=config.target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=planned,
                accountant=config.accountant,
            )
        else:
            noise_multiplier = float(config.noise_multiplier)
        mode = choose_grad_sample_mode(model, config.grad_sample_mode)
        # The noise comes from a generator saved with the accountant, so a resumed run draws the noise an
        # uninterrupted one would (the DataModule saves the batch draws' generator likewise).
        noise_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        engine = PrivacyEngine(accountant=config.accountant)
        if state is not None:
            engine.accountant.history = [tuple(entry) for entry in state["history"]]
            noise_generator.set_state(state["noise_rng"])
        loss_reduction = getattr(criterion, "reduction", "mean")
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=train_loader,  # make_private's own loader is discarded: Lightning iterates ours
            noise_multiplier=noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            poisson_sampling=config.poisson_sampling,
            grad_sample_mode=mode,
            loss_reduction=loss_reduction,
            noise_generator=noise_generator,
            wrap_model=False,
        )
        # make_private derives the rate as 1 / len(loader), which is not the sampler's rate when batch_size does
        # not divide N: account for, and average over, what is really sampled.
        hooks, dp_optimizer = made[0], made[1]
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        dp_optimizer.expected_batch_size = sample_rate * num_members
        dp_criterion = made[2] if mode == "ghost" else criterion  # ghost: a criterion that runs both backward passes
        return cls(config, engine, dp_optimizer, dp_criterion, hooks, noise_generator, noise_multiplier, sample_rate,
                   delta, mode, planned)

    @staticmethod
    def _resume_noise(config: DPConfig, state: Mapping[str, Any], planned: int | None) -> float:
        if state["accountant"] != config.accountant:
            raise ValueError(
                f"the checkpoint was accounted with dp.accountant={state['accountant']!r}, the config says "
                f"{config.accountant!r}; resume with the same accountant"
            )
        if config.target_epsilon is None:
            return float(config.noise_multiplier)
        if state["planned_steps"] != planned:
            raise ValueError(
                f"this run's noise multiplier {state['noise_multiplier']:.4f} was solved to spend "
                f"target_epsilon={config.target_epsilon} over {state['planned_steps']} steps, but the resumed fit "
                f"plans {planned}: keep trainer.max_epochs/max_steps as they were, or give dp.noise_multiplier"
            )
        return float(state["noise_multiplier"])

    @property
    def steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.engine.accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (cached per history: the PRV accountant takes about half a second)."""
        key = tuple(self.engine.accountant.history)
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            self._epsilon_cache = (key, epsilon_of(self.config.accountant, list(key), self.delta))
        return self._epsilon_cache[1]

    def summary(self) -> dict[str, Any]:
        """metrics.json ``target.dp``."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.config.max_grad_norm,
            "accountant": self.config.accountant,
            "grad_sample_mode": self.grad_sample_mode,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.config.accountant,
            "history": [tuple(entry) for entry in self.engine.accountant.history],
            "noise_multiplier": self.noise_multiplier,
            "planned_steps": self.planned_steps,
            "noise_rng": self.noise_generator.get_state(),
        }

    def detach(self) -> None:
        """Remove Opacus' hooks from the network, so evaluation and torch.func feature extraction see a plain one."""
        self.hooks.cleanup()
