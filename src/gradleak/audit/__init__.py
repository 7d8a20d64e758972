"""The audit engine: what leaks from a model, batch size, protocol and defense, as the worst case.

``plan`` (cells x attacks x attacker knowledge x seeds), ``cell`` (the client's defended update
and the defense's utility cost), ``execute`` (in process, a process pool or Ray), ``engine``
(:func:`run_audit`) and ``verdicts`` (the worst case, its uncertainty, and whether a budget was
enough). :mod:`gradleak.reporting.audit_report` writes what a person reads.
"""

from gradleak.audit.cell import cell_update, check_victim, utility
from gradleak.audit.engine import AuditOptions, cell_finished, plan_runs, run_audit
from gradleak.audit.plan import (
    Attacker,
    AttackPlan,
    AuditCell,
    KnowledgeAxes,
    ProtocolSetting,
    attackers_for,
    audit_grid,
    parse_int_list,
    plan_attacks,
)
from gradleak.audit.verdicts import Condition, failing, load_row, verdict, worst_case

__all__ = ["AttackPlan", "Attacker", "AuditCell", "AuditOptions", "Condition", "KnowledgeAxes", "ProtocolSetting",
           "attackers_for", "audit_grid", "cell_finished", "cell_update", "check_victim", "failing", "load_row",
           "parse_int_list", "plan_attacks", "plan_runs", "run_audit", "utility", "verdict", "worst_case"]
