"""A federated membership-inference experiment (PAPER.md Table X): train the federations, attack them, report.

Every setting is checked before any training: the shares, the attacker's record sets, the observed rounds, the
attack and its features. Then the honest federation trains once (the passive attackers observe it and its final
aggregate is the reported target model), each active setting trains its own federation from the same initial
model, shares and batch streams, and every attacker trains the multi-snapshot white-box attack on its known
records and is evaluated on its disjoint target records.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from datamodules.base import MembershipDataModule
from mia_lightning.attacks import ATTACKS, build_attack
from mia_lightning.audit import MULTI_SNAPSHOT, score_records
from mia_lightning.audit import default_delta as attack_delta
from mia_lightning.dp import as_dp_config
from mia_lightning.dp import default_delta as dp_default_delta
from mia_lightning.features import extract_whitebox_features
from mia_lightning.federated.adversary import ASCENTS, PASSIVE_TRAINING, SETTINGS, ActiveAttacker, AttackSetting
from mia_lightning.federated.fedavg import Participant, ParticipantData, StateDict, quiet_lightning, run_fedavg
from mia_lightning.federated.layout import RECORD_SETS, AttackerSizes, FederatedLayout
from mia_lightning.metrics import evaluate_attack
from mia_lightning.run import RunFolder
from mia_lightning.snapshots import load_snapshot, save_snapshot
from mia_lightning.target import TargetModule, evaluate_accuracy

LAYOUT_FILE = "federation.npz"
DEFAULT_GAMMA = 0.3


@dataclass
class FederationConfig:
    """FedAvg's settings. The local batch size is the ``data`` section's ``batch_size``.

    Args:
        participants: equal, disjoint shares of the split's members (num_members must be a multiple).
        rounds: FedAvg rounds; each participant trains ``local_epochs`` epochs per round.
        observed_rounds: the rounds whose models the attackers see (counted from 1); the multi-snapshot attack
            reads all of them. The paper's global attacker saw 5 non-consecutive, late epochs.
        accelerator: Lightning accelerator for local training.
    """

    participants: int = 4
    rounds: int = 20
    local_epochs: int = 5
    observed_rounds: list[int] = field(default_factory=lambda: [12, 14, 16, 18, 20])
    accelerator: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("participants", "rounds", "local_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"federation.{name} must be a positive int, got {value!r}")
        rounds = list(self.observed_rounds)
        if not rounds or any(isinstance(r, bool) or not isinstance(r, int) for r in rounds):
            raise ValueError(f"federation.observed_rounds must be a non-empty list of ints, got {rounds!r}")
        if len(set(rounds)) != len(rounds) or rounds != sorted(rounds):
            raise ValueError(f"federation.observed_rounds must be increasing without repeats, got {rounds}")
        outside = [r for r in rounds if not 1 <= r <= self.rounds]
        if outside:
            raise ValueError(
                f"federation.observed_rounds {outside} are outside the federation's rounds 1..{self.rounds}: "
                "they would never be observed"
            )
        self.observed_rounds = rounds


@dataclass
class AttackerConfig(AttackerSizes):
    """Who attacks, how, and on which records (sizes as in ``AttackerSizes``: the paper's 100 / 100 evaluated).

    Args:
        settings: any of ``global_passive, global_ascent, global_isolating, global_isolating_ascent,
            local_passive, local_ascent``.
        target_participant: the participant whose data the global (server) attacker targets.
        local_attacker: the participant that attacks the others' data; default the last one.
        gamma: the gradient-ascent step (the paper gives no value). With ``ascent: per_record`` it bounds the
            step's length in parameter space; with ``ascent: mean`` it multiplies the mean loss's gradient, which
            grows with the loss, so the step compounds wherever the ascended model comes back (an isolated target,
            a local attacker's share of the average): on the digits config mean-ascent gamma 1.0 collapses the
            isolated target's model to chance within 20 rounds.
        ascent: ``mean`` (default): W <- W + gamma * dL/dW, L the attacked records' mean cross-entropy;
            ``per_record``: W <- W + gamma * mean_i g_i / |g_i| over their own gradients, so records the model
            already fits are pushed as hard as those it gets wrong. See ``gradient_ascent_step``.
        attack: the attack model (``whitebox_multi_epoch``: the paper's multi-snapshot white-box attack).
        attack_kwargs: its arguments, e.g. ``{max_epochs: 50}``.
    """

    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    target_participant: int = 0
    local_attacker: int | None = None
    gamma: float = DEFAULT_GAMMA
    ascent: str = "mean"
    attack: str = MULTI_SNAPSHOT
    attack_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.settings:
            raise ValueError(f"attacker.settings is empty; choose from {', '.join(SETTINGS)}")
        if len(set(self.settings)) != len(self.settings):
            raise ValueError(f"attacker.settings lists a setting more than once: {self.settings}")
        for name in self.settings:
            AttackSetting.parse(name)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 <= self.gamma < math.inf:
            raise ValueError(f"attacker.gamma must be a finite number >= 0, got {self.gamma!r}")
        if self.ascent not in ASCENTS:
            raise ValueError(f"unknown attacker.ascent {self.ascent!r}; valid: {', '.join(ASCENTS)}")
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; available: {', '.join(ATTACKS)}")

    def parsed_settings(self) -> list[AttackSetting]:
        return [AttackSetting.parse(name) for name in self.settings]


@dataclass
class Training:
    """One federation's outcome: the aggregate's test accuracy after every round, its final model, its privacy."""

    name: str
    test_acc_by_round: list[float]
    final: StateDict
    dp: dict[str, Any] | None


@dataclass
class AttackOutcome:
    metrics: dict[str, Any]
    scores: np.ndarray
    labels: np.ndarray


class FederatedExperiment:
    """Everything one ``federated`` run does, checked in ``__init__`` before any training.

    Args:
        data: the DataModule of the ``data`` section, its ``split_file`` in the run folder.
        model: TargetModule arguments (without ``num_classes`` / ``input_shape``), ``dp`` included: every
            participant trains with them; ``dp.target_epsilon`` is spent over the whole federation.
        run: the run folder the snapshots and results go to.
        seed: the initial model, the shares and attacker records, every participant's batches and the attacks.
    """

    def __init__(self, data: MembershipDataModule, model: Mapping[str, Any], federation: FederationConfig,
                 attacker: AttackerConfig, run: RunFolder, seed: int = 0, progress: bool = True) -> None:
        self.federation, self.attacker, self.run = federation, attacker, run
        self.seed, self.progress = seed, progress
        self.settings = attacker.parsed_settings()
        participants = federation.participants
        self.local_attacker = participants - 1 if attacker.local_attacker is None else attacker.local_attacker
        if participants < 2 and any(s.isolating for s in self.settings):
            raise ValueError("isolating settings need at least 2 participants: the target is isolated from the others")
        if attacker.attack == MULTI_SNAPSHOT and len(federation.observed_rounds) < 2:
            raise ValueError(
                f"the {MULTI_SNAPSHOT} attack reads every observed round and needs at least 2; "
                f"federation.observed_rounds is {federation.observed_rounds}"
            )
        self.data = data
        self.split = data.prepare_split()
        self.layout = FederatedLayout.draw(
            self.split, participants, attacker.target_participant, self.local_attacker, attacker, seed,
            positions=sorted({s.position for s in self.settings}),
        )
        model = dict(model)
        for reserved in ("num_classes", "input_shape"):
            if reserved in model:
                raise ValueError(f"model.{reserved} comes from the data section; remove it from model")
        self.model_kwargs = {**model, "num_classes": data.num_classes, "input_shape": tuple(data.input_shape)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            template = TargetModule(**self.model_kwargs)
        self.hparams = dict(template.hparams)
        self.template = template.model.eval()
        self.initial = {k: v.detach().clone() for k, v in self.template.state_dict().items()}
        self.model_kwargs["dp"] = self._participant_dp()
        probe = build_attack(attacker.attack, **attacker.attack_kwargs)
        probe.feature_spec(self.network())  # refuses layers the model does not have, before any training

    # -- building blocks ---------------------------------------------------------------------------------------
    def network(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """A fresh copy of the target architecture in eval mode (the initial weights, or ``state``)."""
        network = copy.deepcopy(self.template)
        if state is not None:
            network.load_state_dict(state)
        return network.eval()

    def participant_data(self, index: int) -> ParticipantData:
        stream = int(np.random.SeedSequence([self.seed, 0xDA7A, index]).generate_state(1)[0])
        return ParticipantData(self.data, self.layout.shares[index], seed=stream)

    def _participant_dp(self) -> dict[str, Any] | None:
        """The participants' ``dp``: a ``target_epsilon`` is turned into the noise that spends it over every round.

        TargetModule would solve it for one ``fit``, i.e. one round, and then keep spending past it.
        """
        dp = as_dp_config(self.model_kwargs.get("dp"))
        if dp is None:
            return None
        if dp.target_epsilon is None:
            return asdict(dp)
        from opacus.accountants.utils import get_noise_multiplier

        data = self.participant_data(0)
        data.poisson_sampling = dp.poisson_sampling
        steps = self.federation.rounds * self.federation.local_epochs * len(data.train_dataloader())
        share = self.layout.share_size
        delta = dp.delta if dp.delta is not None else dp_default_delta(share)
        noise = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=delta,
                                     sample_rate=data.batch_size / share, steps=steps, accountant=dp.accountant)
        return {**asdict(dp), "noise_multiplier": float(noise), "target_epsilon": None, "delta": delta}

    def records(self, indices: np.ndarray) -> DataLoader:
        """The records at ``indices`` in evaluation form and in order (what feature extraction needs)."""
        return DataLoader(Subset(self.data.eval_dataset, indices.tolist()), batch_size=self.data.eval_batch_size)

    def record_tensors(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[(batch[0], batch[1]) for batch in self.records(indices)])
        return torch.cat(xs), torch.cat(ys)

    def trainings(self) -> list[str]:
        """The honest federation first (the reported target model), then one per active setting."""
        return [PASSIVE_TRAINING] + [s.training for s in self.settings if s.active]

    def snapshot_path(self, training: str, round_: int, who: str) -> Path:
        return self.run.snapshots / training / f"round_{round_:03d}" / f"{who}.safetensors"

    def observed_model(self, setting: AttackSetting) -> str:
        """The server sees the target participant's uploads; a participant sees only the aggregates."""
        return f"participant_{self.layout.target_participant}" if setting.position == "global" else "global"

    # -- training ----------------------------------------------------------------------------------------------
    def train(self, training: str) -> Training:
        """One federation from the shared initial model; snapshots at the observed rounds and the last round."""
        fed = self.federation
        participants = []
        for index in range(fed.participants):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                module = TargetModule(**self.model_kwargs)
            participants.append(Participant(module, self.participant_data(index)))
        tampering = None
        if training != PASSIVE_TRAINING:
            setting = next(s for s in self.settings if s.name == training)
            x, y = self.record_tensors(self.layout.attackers[setting.position].all())
            tampering = ActiveAttacker(setting, self.network(), x, y, self.attacker.gamma,
                                       self.layout.target_participant, self.local_attacker, self.attacker.ascent)
        saved_rounds = {*fed.observed_rounds, fed.rounds}
        evaluator = self.network()
        nonmembers = self.data.part_dataloader("nonmembers")
        curve: list[float] = []

        def on_round(round_: int, aggregate: StateDict, uploads: list[StateDict]) -> None:
            evaluator.load_state_dict(aggregate)
            curve.append(evaluate_accuracy(evaluator, nonmembers))
            if round_ not in saved_rounds:
                return
            save_snapshot(self.snapshot_path(training, round_, "global"), aggregate,
                          self._metadata(training, round_, "global"))
            for index, upload in enumerate(uploads):
                save_snapshot(self.snapshot_path(training, round_, f"participant_{index}"), upload,
                              self._metadata(training, round_, "participant", index))

        final = run_fedavg(self.initial, participants, fed.rounds, fed.local_epochs, self.seed, tampering, on_round,
                           fed.accelerator, self.progress, description=f"federation: {training}")
        summaries = [p.module.dp_summary() for p in participants]
        dp = max(summaries, key=lambda s: s["epsilon"]) if all(summaries) else None
        return Training(training, curve, final, dp)

    def _metadata(self, training: str, round_: int, role: str, participant: int | None = None) -> dict[str, Any]:
        metadata = {"epoch": round_, "round": round_, "training": training, "role": role,
                    "local_epochs": self.federation.local_epochs}
        if participant is not None:
            metadata["participant"] = participant
        for key in ("arch", "arch_kwargs", "num_classes", "input_shape"):
            metadata[key] = self.hparams[key]
        metadata["arch_kwargs"] = dict(metadata["arch_kwargs"] or {})
        metadata["input_shape"] = list(metadata["input_shape"])
        return metadata

    # -- attacking ---------------------------------------------------------------------------------------------
    def attack(self, setting: AttackSetting, training: Training) -> AttackOutcome:
        """Fit the attack on the attacker's known records, score its target records, at the observed rounds."""
        started = time.perf_counter()
        who = self.observed_model(setting)
        rounds = self.federation.observed_rounds
        models = [self.network(load_snapshot(self.snapshot_path(training.name, r, who)).state_dict) for r in rounds]
        attack = build_attack(self.attacker.attack, seed=self.seed, progress=self.progress,
                              **self.attacker.attack_kwargs)
        spec = attack.feature_spec(models[0])
        records = self.layout.attackers[setting.position]
        features = {name: extract_whitebox_features(models, self.records(getattr(records, name)), spec)
                    for name in RECORD_SETS}
        attack.fit(features["known_members"], features["known_nonmembers"])
        known = score_records(attack, features["known_members"], features["known_nonmembers"])
        scores, labels = score_records(attack, features["target_members"], features["target_nonmembers"])
        delta = training.dp["delta"] if training.dp else attack_delta(self.layout.share_size)
        metrics = evaluate_attack(scores, labels, delta=delta, calibration=known)
        observes = (f"uploads of participant {self.layout.target_participant}" if setting.position == "global"
                    else f"aggregates received by participant {self.local_attacker}")
        metrics.update(training=training.name, observes=observes, observed_rounds=list(rounds),
                       final_test_acc=training.test_acc_by_round[-1], seconds=round(time.perf_counter() - started, 3))
        return AttackOutcome(metrics, scores, labels)

    # -- the whole experiment ----------------------------------------------------------------------------------
    def run_all(self) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Train every federation, run every attacker; returns (metrics.json content, scores per setting)."""
        self.layout.save(self.run.path / LAYOUT_FILE)
        trainings = {name: self.train(name) for name in self.trainings()}
        with quiet_lightning():
            outcomes = {s.name: self.attack(s, trainings[s.training]) for s in self.settings}
        honest = trainings[PASSIVE_TRAINING]
        final = self.network(honest.final)
        fed = self.federation
        target = {
            "train_acc": evaluate_accuracy(final, self.data.part_dataloader("members")),
            "test_acc": evaluate_accuracy(final, self.data.part_dataloader("nonmembers")),
            "epochs": fed.rounds * fed.local_epochs,
            "participants": fed.participants,
            "rounds": fed.rounds,
            "local_epochs": fed.local_epochs,
            "share_size": self.layout.share_size,
            "dp": honest.dp,
        }
        federation = {
            "target_participant": self.layout.target_participant,
            "local_attacker": self.local_attacker,
            "gamma": self.attacker.gamma,
            "ascent": self.attacker.ascent,
            "observed_rounds": list(fed.observed_rounds),
            "trainings": {
                name: {"test_acc_by_round": t.test_acc_by_round,
                       "epsilon": t.dp["epsilon"] if t.dp else None}
                for name, t in trainings.items()
            },
        }
        metrics = {"target": target, "attacks": {n: o.metrics for n, o in outcomes.items()}, "federation": federation}
        return metrics, {n: (o.scores, o.labels) for n, o in outcomes.items()}

