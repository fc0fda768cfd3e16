"""FedAvg, the federated attackers and the ``federated`` command (issue #8)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from datamodules.digits import DigitsDataModule
from mia_lightning.commands.federated import main
from mia_lightning.federated import (
    SETTINGS,
    ActiveAttacker,
    AttackerSizes,
    AttackSetting,
    FederatedLayout,
    Participant,
    ParticipantData,
    Tampering,
    average_states,
    gradient_ascent_step,
    run_fedavg,
)
from mia_lightning.metrics import evaluate_attack
from mia_lightning.models import build_model
from mia_lightning.snapshots import clean_state_dict, load_snapshot
from mia_lightning.target import TargetModule

TINY_MODEL = {"arch": "fc", "arch_kwargs": {"widths": [32]}, "num_classes": 10, "input_shape": (64,)}
# A whole experiment in seconds: 4 x 40 records, 2 rounds, a small model and a 2-epoch attack.
DIGITS_CONFIG = Path(__file__).parents[1] / "configs" / "federated" / "digits.yaml"
TINY_RUN = [
    "--progress", "false",
    "--data.init_args.num_members", "160",
    "--model.arch_kwargs", '{"widths": [32]}',
    "--federation.rounds", "2", "--federation.local_epochs", "1", "--federation.observed_rounds", "[1, 2]",
    "--attacker.target_members", "20", "--attacker.target_nonmembers", "20",
    "--attacker.known_members", "10", "--attacker.known_nonmembers", "10",
    "--attacker.attack_kwargs", '{"max_epochs": 2, "kernels": 4}',
]


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(num_members=120, seed=0, batch_size=16)
    data.prepare_split()
    return data


def _module(**overrides) -> TargetModule:
    torch.manual_seed(0)
    return TargetModule(**{**TINY_MODEL, **overrides})


def _federated(tmp_path, *args: str, run_name: str = "fed"):
    main(["--config", str(DIGITS_CONFIG), "--runs_dir", str(tmp_path / "runs"), "--run_name", run_name, *TINY_RUN,
          *args])
    return tmp_path / "runs" / run_name


# -- FedAvg --------------------------------------------------------------------------------------------------------
def test_fedavg_with_one_participant_equals_centralised_training(digits):
    """Rounds of local epochs with a stateless optimizer = one run over all epochs on the same data and batches."""
    share = digits.split.members
    fed_module = _module(optimizer="sgd", lr=0.1, momentum=0.0)
    initial = clean_state_dict(fed_module.model)
    final = run_fedavg(initial, [Participant(fed_module, ParticipantData(digits, share, seed=7))],
                       rounds=3, local_epochs=2, seed=0)

    central = _module(optimizer="sgd", lr=0.1, momentum=0.0)
    central.model.load_state_dict(initial)
    loader = DataLoader(Subset(digits.train_dataset, share.tolist()), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(7))
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, deterministic=True)
    trainer.fit(central, train_dataloaders=loader)

    expected = central.model.state_dict()
    assert any((final[k] - initial[k]).abs().max() > 1e-3 for k in final), "training did not move the weights"
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-6)


def test_average_states_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen),
               "count": torch.tensor(i + 5)} for i in range(3)]
    averaged = average_states(states)
    for key in ("w", "b"):
        expected = torch.zeros_like(states[0][key])
        for state in states:
            expected += state[key] / len(states)
        torch.testing.assert_close(averaged[key], expected)
    assert averaged["count"] == states[0]["count"]  # integers cannot be averaged: the first upload's
    with pytest.raises(ValueError, match="different parameter names"):
        average_states([states[0], {"v": states[1]["w"]}])


class _Recorder(Tampering):
    def __init__(self, isolated: int | None) -> None:
        self.isolated = isolated
        self.received: dict[tuple[int, int], dict] = {}
        self.round = 0

    def sent(self, state, participant):
        if participant == 0:
            self.round += 1
        self.received[(self.round, participant)] = state
        return state


def test_isolation_sends_the_target_its_own_model_and_averages_the_others(digits):
    shares = np.array_split(digits.split.members, 3)
    participants = [Participant(_module(), ParticipantData(digits, share, seed=i)) for i, share in enumerate(shares)]
    recorder, uploads = _Recorder(isolated=1), {}
    initial = clean_state_dict(participants[0].module.model)
    final = run_fedavg(initial, participants, rounds=2, local_epochs=1, seed=0, tampering=recorder,
                       on_round=lambda r, aggregate, ups: uploads.update({r: (aggregate, ups)}))
    aggregate_1, uploads_1 = uploads[1]
    for key, value in aggregate_1.items():  # the isolated participant's upload is left out of the average
        torch.testing.assert_close(value, (uploads_1[0][key] + uploads_1[2][key]) / 2)
    assert recorder.received[(2, 1)] is uploads_1[1]  # the target trains on from its own model
    assert recorder.received[(2, 0)] is aggregate_1 and recorder.received[(2, 2)] is aggregate_1
    assert final is uploads[2][0]


# -- the attacker --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ascent", ["mean", "per_record"])
def test_gradient_ascent_step_matches_a_loop_over_records(ascent):
    torch.manual_seed(0)
    model = build_model("fc", 10, (64,), widths=[16], dropout=0.5)
    x, y = torch.rand(70, 64), torch.randint(0, 10, (70,))  # more records than one vectorised chunk
    expected = copy.deepcopy(model).eval()
    grads = [torch.zeros_like(p) for p in expected.parameters()]
    for i in range(len(y)):  # the slow obvious way: one record at a time, averaged
        loss = F.cross_entropy(expected(x[i : i + 1]), y[i : i + 1])
        record = torch.autograd.grad(loss, list(expected.parameters()))
        scale = 1.0
        if ascent == "per_record":
            scale = 1.0 / torch.sqrt(sum(g.pow(2).sum() for g in record))
        for total, grad in zip(grads, record):
            total += scale * grad / len(y)
    with torch.no_grad():
        for param, grad in zip(expected.parameters(), grads):
            param += 0.7 * grad
    before = F.cross_entropy(copy.deepcopy(model).eval()(x), y).item()
    model.train()
    gradient_ascent_step(model, x, y, gamma=0.7, ascent=ascent)
    assert model.training  # the mode is restored; the step itself ran without dropout
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert F.cross_entropy(expected(x), y).item() > before  # up the loss, not down
    with pytest.raises(ValueError, match="unknown ascent"):
        gradient_ascent_step(model, x, y, gamma=0.7, ascent="sideways")


def test_active_attackers_tamper_only_where_they_sit():
    network = build_model("fc", 10, (64,), widths=[8])
    state = clean_state_dict(network)
    x, y = torch.rand(4, 64), torch.randint(0, 10, (4,))

    def changed(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a)

    server = ActiveAttacker(AttackSetting.parse("global_ascent"), copy.deepcopy(network), x, y, 0.5, 0, 3)
    assert changed(server.sent(state, 0), state) and not changed(server.sent(state, 1), state)
    assert server.sent(state, 0) is server.sent(state, 0)  # one ascent per model sent
    assert not changed(server.uploaded(state, 0), state) and server.isolated is None
    local = ActiveAttacker(AttackSetting.parse("local_ascent"), copy.deepcopy(network), x, y, 0.5, 0, 3)
    assert changed(local.uploaded(state, 3), state) and not changed(local.uploaded(state, 0), state)
    assert not changed(local.sent(state, 3), state)
    isolating = ActiveAttacker(AttackSetting.parse("global_isolating"), copy.deepcopy(network), x, y, 0.5, 2, 3)
    assert isolating.isolated == 2 and not changed(isolating.sent(state, 2), state)


def test_settings_parse_and_refuse():
    assert [AttackSetting.parse(n).training for n in SETTINGS] == [
        "passive", "global_ascent", "global_isolating", "global_isolating_ascent", "passive", "local_ascent"]
    with pytest.raises(ValueError, match="only global settings can isolate"):
        AttackSetting.parse("local_isolating")
    with pytest.raises(ValueError, match="valid: global_passive"):
        AttackSetting.parse("server_passive")


def test_layout_is_disjoint_reproducible_and_where_each_attacker_looks(digits):
    split = digits.split
    sizes = AttackerSizes(target_members=15, target_nonmembers=20, known_members=10, known_nonmembers=30)
    layout = FederatedLayout.draw(split, 4, target_participant=1, local_attacker=3, sizes=sizes, seed=5)
    assert [len(s) for s in layout.shares] == [30] * 4
    assert np.array_equal(np.sort(np.concatenate(layout.shares)), split.members)
    for position, records in layout.attackers.items():
        parts = [records.known_members, records.known_nonmembers, records.target_members, records.target_nonmembers]
        assert [len(p) for p in parts] == [10, 30, 15, 20]
        assert len(np.unique(np.concatenate(parts))) == 75, f"{position} record sets overlap"
        assert np.isin(records.known_nonmembers, split.nonmembers).all()
        assert np.isin(records.target_nonmembers, split.nonmembers).all()
    glob, local = layout.attackers["global"], layout.attackers["local"]
    assert np.isin(np.concatenate([glob.known_members, glob.target_members]), layout.shares[1]).all()
    local_members = np.concatenate([local.known_members, local.target_members])
    assert np.isin(local_members, split.members).all() and not np.isin(local_members, layout.shares[3]).any()
    again = FederatedLayout.draw(split, 4, 1, 3, sizes, seed=5, positions=["global"])
    assert all(np.array_equal(a, b) for a, b in zip(again.shares, layout.shares))
    assert np.array_equal(again.attackers["global"].target_members, glob.target_members)
    other = FederatedLayout.draw(split, 4, 1, 3, sizes, seed=6)
    assert not np.array_equal(other.shares[0], layout.shares[0])


# -- the command ---------------------------------------------------------------------------------------------------
def test_federated_command_writes_the_run_folder_contract(tmp_path):
    run = _federated(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    target = metrics["target"]
    assert {"train_acc", "test_acc", "participants", "rounds", "epochs", "dp"} <= set(target)
    assert target["participants"] == 4 and target["rounds"] == 2 and target["dp"] is None
    assert list(metrics["attacks"]) == list(SETTINGS)
    reference = evaluate_attack(np.arange(4.0), np.array([0, 1, 0, 1]))
    for name, entry in metrics["attacks"].items():
        assert set(reference) <= set(entry), name
        assert entry["n_members"] == 20 and entry["n_nonmembers"] == 20
        assert 0.0 <= entry["auc"] <= 1.0 and entry["observed_rounds"] == [1, 2]
    assert metrics["attacks"]["global_isolating"]["training"] == "global_isolating"
    assert metrics["attacks"]["local_passive"]["training"] == "passive"
    for name in ("config.yaml", "split.npz", "federation.npz", "report.md", "plots/roc.png", "attack_scores.npz"):
        assert (run / name).is_file(), name
    assert "global_isolating_ascent" in (run / "report.md").read_text()
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run"
    trainings = {p.name for p in (run / "snapshots").iterdir()}
    assert trainings == {"passive", "global_ascent", "global_isolating", "global_isolating_ascent", "local_ascent"}
    upload = load_snapshot(run / "snapshots" / "passive" / "round_002" / "participant_3.safetensors")
    assert upload.metadata["round"] == 2 and upload.metadata["participant"] == 3

    with pytest.raises(ValueError, match="already holds a finished run"):
        _federated(tmp_path)
    # Same seed -> same shares and same numbers; --overwrite replaces the finished run.
    _federated(tmp_path, "--overwrite", "true", "--log_wandb", "false")
    again = json.loads((run / "metrics.json").read_text())
    assert again["target"] == target
    assert {n: m["auc"] for n, m in again["attacks"].items()} == {n: m["auc"] for n, m in metrics["attacks"].items()}


def test_dp_participants_spend_target_epsilon_over_the_whole_federation(tmp_path):
    run = _federated(
        tmp_path, "--model.dp", '{"target_epsilon": 3.0, "accountant": "rdp"}', "--log_wandb", "false",
        "--data.init_args.batch_size", "16",
        "--attacker.settings", "[global_passive]",
    )
    dp = json.loads((run / "metrics.json").read_text())["target"]["dp"]
    # 2 rounds x 1 epoch of Poisson batches at rate 16/40: int(1 / rate) = 2 steps per epoch.
    assert dp["steps"] == 4
    assert 2.7 < dp["epsilon"] <= 3.0


@pytest.mark.parametrize(("args", "message"), [
    (["--federation.participants", "200", "--data.init_args.num_members", "160"], "exceeds the split's 160"),
    (["--federation.participants", "3"], "cannot be dealt into 3 equal shares"),
    (["--attacker.gamma", "-0.1"], "gamma must be a finite number >= 0"),
    (["--attacker.ascent", "sideways"], "unknown attacker.ascent 'sideways'"),
    (["--attacker.settings", "[local_isolating]"], "only global settings can isolate"),
    (["--federation.observed_rounds", "[1, 3]"], r"observed_rounds \[3\] are outside"),
    (["--attacker.target_members", "35"], "exceed the 40 records of the target participant's share"),
])
def test_bad_settings_are_refused_before_training(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        _federated(tmp_path, *args)
    run = tmp_path / "runs" / "fed"
    assert not (run / "snapshots").exists() and not (run / "metrics.json").exists()


@pytest.mark.parametrize("config", sorted(str(p) for p in
                                          (Path(__file__).parents[1] / "configs" / "federated").glob("*.yaml")))
def test_every_shipped_federated_config_passes_the_checks_made_before_training(tmp_path, config):
    from mia_lightning.commands.federated import build_parser
    from mia_lightning.federated.experiment import AttackerConfig, FederatedExperiment, FederationConfig
    from mia_lightning.run import RunFolder

    parser = build_parser()
    cfg = parser.parse_args(["--config", config])
    cfg.data.init_args.split_file = str(tmp_path / "split.npz")
    data = parser.instantiate_classes(cfg).data
    experiment = FederatedExperiment(data, cfg.model.as_dict(), FederationConfig(**cfg.federation.as_dict()),
                                     AttackerConfig(**cfg.attacker.as_dict()), RunFolder(tmp_path), cfg.seed)
    assert len(experiment.settings) == 6 and experiment.split.stratified


def test_the_default_config_applies_only_when_none_is_given(capsys):
    with pytest.raises(SystemExit):
        main(["--print_config"])
    assert "SyntheticPurchaseDataModule" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", str(DIGITS_CONFIG), "--print_config"])
    out = capsys.readouterr().out
    assert "DigitsDataModule" in out and "num_records" not in out and "per_record" not in out
