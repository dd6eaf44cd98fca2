"""Which runbook a request names or guesses, and when a live start refuses the guess."""

from __future__ import annotations

import pytest

from agent.runbook.matching import choose_runbook, guess_of, live_guess_refusal
from agent.runbook.model import RunbookCatalog, load_catalog
from agent.runbook.request import parse_request
from tests.cli_helpers import REPO

SHELL = ["LOOM_OPS_ALLOW_SHELL=1"]


@pytest.fixture(scope="module")
def catalog() -> RunbookCatalog:
    """The runbooks shipped in the repository."""
    return load_catalog(REPO / "runbooks")


@pytest.mark.parametrize(
    "request_text",
    [
        "failed-deploy-rollback",
        "failed-deploy-rollback namespace=staging",
        "runbook=failed-deploy-rollback the deploy broke",
        # Ids are lowercase slugs: `runbook=` names one in any case.
        "runbook=FAILED-DEPLOY-ROLLBACK the deploy broke",
    ],
)
def test_a_request_that_names_its_runbook_is_no_guess(
    catalog: RunbookCatalog, request_text: str
) -> None:
    assert guess_of(catalog, request_text) is None
    assert live_guess_refusal(SHELL, catalog, request_text) is None
    chosen = choose_runbook(catalog, parse_request(request_text), request_text)
    assert chosen.id == "failed-deploy-rollback"


def test_a_first_word_names_a_runbook_only_as_written(catalog: RunbookCatalog) -> None:
    """A capitalised first word may be a sentence's: it is a guess, which a live start asks
    a person to confirm (`runbook=` is no sentence, and folds)."""
    refused = live_guess_refusal(SHELL, catalog, "Failed-Deploy-Rollback namespace=staging")
    assert refused is not None and " from a guess: " in refused[0]
    assert refused[1].runbook is not None and refused[1].runbook.id == "failed-deploy-rollback"


def test_only_ascii_folds_to_a_runbook_id(catalog: RunbookCatalog) -> None:
    """A lookalike letter that lowercases to ASCII (the Kelvin sign to `k`) names nothing:
    its words may still match the runbook, as a guess a live start asks a person to confirm."""
    lookalike = "dis\u212a-almost-full"
    assert lookalike.lower() == "disk-almost-full" in catalog.runbooks
    refused = live_guess_refusal(SHELL, catalog, f"runbook={lookalike} disk full")
    assert refused is not None and " from a guess: " in refused[0]
    assert live_guess_refusal(SHELL, catalog, "runbook=DISK-ALMOST-FULL disk full") is None


def test_a_guess_carries_the_runbook_its_params_and_the_request_naming_exactly_that(
    catalog: RunbookCatalog,
) -> None:
    guess = guess_of(catalog, "failed deploy of checkout-api namespace=staging")
    assert guess is not None and guess.runbook is not None
    assert guess.runbook.id == "failed-deploy-rollback"
    assert guess.params["namespace"] == "staging"  # given; the others are the defaults
    assert guess.named().startswith("failed-deploy-rollback ")
    assert "namespace=staging" in guess.named().split()
    assert guess_of(catalog, guess.named()) is None  # the request it suggests names it


def test_a_live_start_refuses_a_guess_or_no_match_and_a_dry_one_refuses_nothing(
    catalog: RunbookCatalog,
) -> None:
    assert live_guess_refusal([], catalog, "failed deploy of checkout-api") is None
    refused = live_guess_refusal(SHELL, catalog, "failed deploy of checkout-api")
    assert refused is not None
    why, guess = refused
    assert why.startswith("not starting a live run (LOOM_OPS_ALLOW_SHELL=1) from a guess: ")
    assert "matched runbook failed-deploy-rollback with " in why
    assert guess.runbook is not None and guess.runbook.id == "failed-deploy-rollback"

    nothing = live_guess_refusal(SHELL, catalog, "the printer is on fire")
    assert nothing is not None and nothing[1].runbook is None
    assert "names no runbook (known: api-latency-spike, " in nothing[0]
    # An unknown `runbook=` id names nothing the catalog holds: a guess like any other.
    unknown = live_guess_refusal(SHELL, catalog, "runbook=no-such-runbook printer on fire")
    assert unknown is not None and unknown[1].runbook is None
