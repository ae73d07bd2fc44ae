"""The decisions ops take by hand, in gateway.domain: abandoning a parked operation and the bank
references a receipt may be given.

Written from the brief of issue 11 row 13 and docs/bank.md (ids are a
prefix plus a lowercase UUID), not copied from gateway/domain/.
"""

from __future__ import annotations

import uuid

import pytest

from gateway import domain
from gateway.domain import InvalidTransition, OperationKind, Status

K = OperationKind
S = Status

# Parked operation -> (the payment's status while it runs, after abandoning, the bank work it starts).
ABANDON = {
    K.AUTHORIZE: (S.PENDING, S.DECLINED, None),  # a hold the bank may have placed lapses by itself
    K.CAPTURE: (S.CAPTURING, S.VOIDING, K.VOID),  # the hold is voided
    K.VOID: (S.VOIDING, S.VOIDING, K.VOID),  # ... with a new void
    K.REFUND: (S.REFUNDING, S.CAPTURED, None),  # back where it was
    K.RELEASE: (S.EXPIRED, S.EXPIRED, None),  # stays expired
}


def test_every_operation_kind_has_an_abandonment():
    assert set(ABANDON) == set(OperationKind)


@pytest.mark.parametrize("kind", list(OperationKind))
def test_abandoning_a_parked_operation(kind):
    running, after, follow_up = ABANDON[kind]
    plan = domain.abandon(kind, running)
    assert (plan.status, plan.follow_up) == (after, follow_up)


@pytest.mark.parametrize("kind", list(OperationKind))
def test_abandoning_is_a_refusal_except_that_a_hold_is_voided(kind):
    """No guess about money: the payment ends as if the bank had refused, or voids the hold."""
    plan = domain.abandon(kind, ABANDON[kind][0])
    refused = domain.settle(kind, domain.Verdict.REFUSED)
    assert plan.status is refused or (plan.status is S.VOIDING and plan.follow_up is K.VOID)


@pytest.mark.parametrize("kind", list(OperationKind))
@pytest.mark.parametrize("status", list(Status))
def test_abandoning_refuses_a_payment_not_in_the_operations_running_status(kind, status):
    if status is ABANDON[kind][0]:
        return
    with pytest.raises(InvalidTransition):
        domain.abandon(kind, status)


def test_a_void_is_started_by_the_only_abandonments_that_may_leave_a_hold_we_can_name():
    starts_void = {k for k in OperationKind if domain.abandon(k, ABANDON[k][0]).follow_up is K.VOID}
    assert starts_void == {K.CAPTURE, K.VOID}


# ---- bank references -------------------------------------------------------------------------------

PREFIX = {"authorization_id": "auth_", "capture_id": "cap_", "void_id": "void_", "refund_id": "ref_"}
# Statuses whose receipt may carry each reference.
CARRIES = {
    "authorization_id": set(Status) - {S.PENDING, S.DECLINED},
    "capture_id": {S.CAPTURED, S.REFUNDING, S.REFUNDED},
    "void_id": {S.VOIDED, S.EXPIRED},
    "refund_id": {S.REFUNDED},
}


@pytest.mark.parametrize("name", list(PREFIX))
def test_a_reference_is_its_prefix_and_a_lowercase_uuid(name):
    good = f"{PREFIX[name]}{uuid.uuid4()}"
    assert domain.reference_problem(name, good) is None
    for bad in (
        good.upper(),
        f"{PREFIX[name]}{uuid.uuid4().hex}",  # no dashes
        f"{PREFIX[name]}{uuid.uuid4()}x",
        f" {good}",
        good.replace(PREFIX[name], "xx_"),
        PREFIX[name],
        "",
        f"{PREFIX[name]}{uuid.uuid4()}\n",
    ):
        problem = domain.reference_problem(name, bad)
        assert problem is not None and "lowercase UUID" in problem, bad


def test_a_reference_with_another_kinds_prefix_is_refused():
    assert domain.reference_problem("capture_id", f"ref_{uuid.uuid4()}") is not None
    assert "not a bank reference" in domain.reference_problem("order_id", f"ord_{uuid.uuid4()}")


@pytest.mark.parametrize("name", list(PREFIX))
@pytest.mark.parametrize("status", list(Status))
def test_a_reference_only_fits_statuses_that_have_one(name, status):
    problem = domain.reference_problem(name, f"{PREFIX[name]}{uuid.uuid4()}", status)
    assert (problem is None) == (status in CARRIES[name]), problem


@pytest.mark.parametrize("kind", list(OperationKind))
def test_a_settled_success_leaves_a_reference_its_status_may_carry(kind):
    name = domain.REFERENCE_OF[kind]
    status = domain.settle(kind, domain.Verdict.SUCCEEDED)
    assert domain.reference_problem(name, f"{PREFIX[name]}{uuid.uuid4()}", status) is None
