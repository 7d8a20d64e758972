"""The audit's plan: which attacks apply, which attacker assumptions run, and bad input refused."""

from __future__ import annotations

import pytest

from gradleak.attacks import ATTACKS
from gradleak.audit.plan import Attacker, KnowledgeAxes, attackers_for, plan_attacks, untried_knowledge, with_budgets
from gradleak.cli.main import main
from gradleak.errors import ConfigError
from gradleak.models import build_model
from gradleak.types import ModelSpec, ServerState


def _server(name: str, **kw) -> ServerState:
    spec = ModelSpec(name=name, **kw)
    return ServerState.from_spec(build_model(spec, seed=0), spec)


def test_auto_selects_every_attack_that_applies_to_a_relu_resnet():
    plan = plan_attacks("auto", _server("resnet18", activation="relu"))
    assert set(plan.names) >= {"cinet", "ig", "dlg", "idlg"} and "analytic" not in plan.names
    assert "one-layer" in plan.left_out["analytic"] and "generator" in plan.left_out["gias"]


def test_auto_includes_analytic_on_a_one_layer_victim_and_drops_it_for_local_steps():
    server = _server("linear", image_size=8)
    assert "analytic" in plan_attacks("auto", server).names
    plan = plan_attacks("auto", server, local_steps=[1, 3])
    assert "analytic" not in plan.names and "local steps" in plan.left_out["analytic"]


def test_every_registered_attack_is_planned_or_left_out_with_a_reason():
    plan = plan_attacks("auto", _server("lenet"))
    assert sorted([*plan.names, *plan.left_out]) == sorted(ATTACKS.available())
    assert all(reason for reason in plan.left_out.values())


def test_budget_overrides_and_presets_go_to_the_attacks_that_have_them():
    plan = plan_attacks("cinet,ig,analytic", _server("linear", image_size=8), iterations=7,
                        overrides={"channels": 8, "tv": 0.01}, presets={"cinet": "demo"})
    assert plan.configs["cinet"].iterations == 7 and plan.configs["ig"].iterations == 7
    assert plan.configs["cinet"].channels == 8 and plan.configs["ig"].tv == 0.01
    assert not hasattr(plan.configs["analytic"], "channels")  # closed form: no budget, no channels


@pytest.mark.parametrize("names, kw, message", [
    ("analytic", {}, "analytic needs a one-layer softmax victim"),
    ("gias", {}, "needs a pretrained generator"),
    ("nope", {}, "unknown attack 'nope'"),
    ("", {}, "expected 'auto' or attack names"),
    ("cinet", {"overrides": {"no_such_field": 1}}, "--set no_such_field"),
    ("ig", {"presets": {"cinet": "demo"}}, "expected a preset of an audited attack"),
])
def test_bad_attack_requests_are_refused(names, kw, message):
    with pytest.raises(ConfigError, match=message):
        plan_attacks(names, _server("lenet"), **kw)


def test_knowledge_axes_and_attackers():
    assert KnowledgeAxes.parse(None) == KnowledgeAxes.parse("all") == KnowledgeAxes()
    k = KnowledgeAxes.parse("labels-known")
    assert k.labels == ("known",) and k.defense == ("unaware", "aware")
    assert untried_knowledge(k, defended=True) == ["labels recovered"]
    assert untried_knowledge(k, defended=False) == ["labels recovered"]
    with pytest.raises(ConfigError, match="unknown assumption 'labels-guessed'"):
        KnowledgeAxes.parse("labels-guessed")
    undefended, missing = attackers_for("cinet", defended=False)
    assert [a.id for a in undefended] == ["cinet_labels-recovered", "cinet_labels-known"] and not missing
    off, missing = attackers_for("cinet", defended=True, attack_config={"adaptive": "off"},
                                 knowledge=KnowledgeAxes(labels=("recovered",)))
    assert [a.id for a in off] == ["cinet_unaware_labels-recovered"] and missing == ["cinet defense-aware (turned off)"]
    for a in (Attacker("dlg", "known", "unaware"), Attacker("ig", "recovered", "none")):
        assert Attacker.parse(a.id) == a
    assert Attacker("cinet", defense="unaware").config({"adaptive": "auto", "channels": 8}) == {"adaptive": "off",
                                                                                                 "channels": 8}


def test_shared_batchnorm_statistics_are_tried_used_and_ignored():
    """Where the client shares them, each attack that can match them runs with and without them."""
    attackers, missing = attackers_for("cinet", defended=False, shares_bn=True,
                                       knowledge=KnowledgeAxes(labels=("known",)))
    assert [a.id for a in attackers] == ["cinet_labels-known_bn-used", "cinet_labels-known_bn-ignored"] and not missing
    assert Attacker.parse(attackers[1].id) == attackers[1]
    assert attackers[1].config({"bn_stats": 0.1, "adaptive": "auto"}) == {"bn_stats": 0.0, "adaptive": "auto"}
    assert attackers[0].config({"bn_stats": 0.1, "adaptive": "auto"}) == {"bn_stats": 0.1, "adaptive": "auto"}
    _, missing = attackers_for("analytic", defended=False, shares_bn=True)
    assert missing == ["analytic with the shared BatchNorm statistics (it cannot match them)"]
    assert [a.bn for a in attackers_for("ig", defended=False)[0]] == ["none", "none"]  # nothing shared: no axis
    only = KnowledgeAxes.parse("bn-used")
    assert only.bn == ("used",) and untried_knowledge(only, defended=False, shares_bn=True) == [
        "BatchNorm statistics ignored"]
    assert untried_knowledge(only, defended=False) == []


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "nope"], "unknown attack 'nope'"),
    (["--knowledge", "bn-maybe"], "unknown assumption 'bn-maybe'"),
    (["--share-bn-stats"], "--share-bn-stats: expected a victim with BatchNorm layers in train mode"),
    (["--attacks", "analytic"], "analytic needs a one-layer softmax victim"),
    (["--knowledge", "labels-guessed"], "unknown assumption"),
    (["--knowledge", "labels-known", "--labels", "given"], "--knowledge: expected it alone"),
    (["--attacks", "cinet", "--attack", "ig"], "expected it or --attack"),
    (["--attacks", "cinet", "--set", "nonsense=1"], "--set nonsense"),
    (["--backend", "ray", "--workers", "0"], "workers: expected a positive integer"),
    (["--attacks", "imprint"], "expected --threat malicious"),
    (["--threat", "evil"], "--threat: expected honest and/or malicious"),
    (["--threat", "malicious", "--attacks", "cinet"], "expected an attack of a malicious server"),
])
def test_bad_audit_requests_exit_2_with_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["audit", "--model", "lenet", "--batch-sizes", "1", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradleak audit: error:") and "\n" not in err and message in err, err
    assert not out.exists()


def test_attacks_with_a_feature_variant_run_with_and_without_the_recovered_features():
    """IG (a feature variant) is tried both ways where the victim's last layer gives the features;
    CI-Net (measured to lose with the term) and an attack on a victim without them are not."""
    from gradleak.audit.engine import gives_features

    attackers, _ = attackers_for("ig", defended=False, features=True, knowledge=KnowledgeAxes(labels=("recovered",)))
    assert [a.id for a in attackers] == ["ig_labels-recovered_features-used", "ig_labels-recovered_features-ignored"]
    assert Attacker.parse(attackers[0].id) == attackers[0]
    on, off = ({k: v for k, v in a.config({"features": 0.5, "feature_init": 10}).items() if k != "adaptive"}
               for a in attackers)
    assert on == {"features": 0.5, "feature_init": 10} and off == {"features": 0.0, "feature_init": 0}  # its own kept
    default = attackers[0].config({"features": 0.0, "feature_init": 0})
    assert (default["features"], default["feature_init"]) == (1.0, 50)
    assert [a.features for a in attackers_for("cinet", defended=False, features=True)[0]] == ["none", "none"]
    assert [a.features for a in attackers_for("ig", defended=False)[0]] == ["none", "none"]
    only = KnowledgeAxes.parse("features-used")
    assert untried_knowledge(only, defended=False, features=True) == ["last-layer features ignored"]
    assert gives_features(_server("lenet")) and gives_features(_server("resnet18"))
    with pytest.raises(ConfigError, match="unknown assumption 'features-maybe'"):
        KnowledgeAxes.parse("features-maybe")


def test_on_a_flat_victim_attacks_with_a_centred_variant_run_centred_and_plain():
    """CI-Net and IG are tried centred (16 noise batches, the per-layer cosine) and as configured where the
    victim's landscape is flat; DLG, which optimises its labels jointly, is not, and says why; a victim
    that is not flat gets no centred attacker."""
    knowledge = KnowledgeAxes(labels=("recovered",))
    attackers, _ = attackers_for("cinet", defended=False, flat=True, knowledge=knowledge)
    assert [a.id for a in attackers] == ["cinet_labels-recovered_center-used", "cinet_labels-recovered_center-ignored"]
    assert all(Attacker.parse(a.id) == a for a in attackers)
    on, off = (a.config({"center": 0, "loss": "cosine", "iterations": 300}) for a in attackers)
    assert (on["center"], on["loss"]) == (16, "cosine-layer") and (off["center"], off["loss"]) == (0, "cosine")
    assert attackers[0].describe() == "cinet, labels recovered, centred matching"
    budgeted = with_budgets(attackers[:1], [100])[0]
    assert budgeted.id == "cinet_labels-recovered_center-used_it-100" and Attacker.parse(budgeted.id) == budgeted
    assert [a.center for a in attackers_for("cinet", defended=False, knowledge=knowledge)[0]] == ["none"]
    assert [a.center for a in attackers_for("analytic", defended=False, flat=True, knowledge=knowledge)[0]] == ["none"]
    dlg, why = attackers_for("dlg", defended=False, flat=True, knowledge=knowledge, attack_config={"soft_labels": True})
    assert [a.center for a in dlg] == ["none"] and why == ["dlg centred (it optimises its labels jointly: nothing to "
                                                          "centre with)"]
    only = KnowledgeAxes.parse("center-used")
    assert only.center == ("used",) and "center-used" in only.tokens()
    assert untried_knowledge(only, defended=False, flat=True) == ["uncentred matching"]
    assert untried_knowledge(only, defended=False) == []
    with pytest.raises(ConfigError, match="center-used, center-ignored"):
        KnowledgeAxes.parse("center-sometimes")
