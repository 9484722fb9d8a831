"""HTTP schemas of feeds: a steward's definition, what consumers and oversight are shown."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from civicdp.server.services.documented_shapes import FeedFailure, FeedRefusal
from civicdp.server.services.request_bodies import DocumentAs, QueryRequest

FEED_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
AGENCY = r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,99})$"


class FeedDefinition(BaseModel):
    """What a steward sends to define a feed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "name": "health-monthly", "dataset": "civic-demo",
        "specs": [{"aggregate": "count", "group_by": ["service_id"], "epsilon": 0.1}],
        "schedule": "monthly", "releases": 12, "agencies": ["health"]}]})
    name: str = Field(pattern=FEED_NAME, description="Lower-case letters, digits, '.', '_' and '-'")
    dataset: str = Field(min_length=1, max_length=100)
    specs: list[Annotated[dict[str, Any], DocumentAs(QueryRequest)]] = Field(min_length=1, max_length=20,
                                        description="Query or analysis specs, each with its epsilon (or accuracy); "
                                                    "their losses add up to the loss per release")
    schedule: str = Field(min_length=1, max_length=100,
                          description="daily, weekly (Mondays), monthly (the 1st), at 00:00 UTC, or a cron "
                                      "expression in UTC such as '0 6 * * mon'")
    releases: int = Field(ge=1, le=1000, description="How many releases the feed announces (its horizon)")
    start: datetime | None = Field(default=None, description="First possible release time (default: now)")
    agencies: list[Annotated[str, Field(pattern=AGENCY)]] = Field(min_length=1, max_length=50,
                                description="Agencies whose feed consumers may read it ('*': every agency)")


class FeedSummary(BaseModel):
    """A feed as its consumers see it."""

    name: str
    dataset: str
    schedule: str
    releases: int = Field(description="Releases announced")
    produced: int = Field(description="Releases produced so far")
    latest: int | None = Field(description="Number of the latest release, if any")
    next_release_at: datetime | None = Field(description="The first announced release time after now not "
                                                         "released yet (a steward may release a period early)")
    epsilon_per_release: float
    url: str


class FeedOverview(BaseModel):
    """A feed as stewards and oversight see it: its schedule, what it spent and what it will spend."""

    name: str
    dataset: str
    schedule: str
    cron: str = Field(description="The schedule as a crontab (UTC)")
    start: datetime
    end: datetime = Field(description="Time of the last announced release")
    agencies: list[str]
    active: bool
    releases: int
    produced: int
    refused: int = Field(description="Periods not released whose latest attempt was refused (nothing charged)")
    failed: int = Field(description="Periods not released whose latest attempt was charged and then failed "
                                    "(the charge stands; a steward's trigger tries again and is charged again)")
    charged_not_released: int = Field(description="Periods charged and not released yet: being computed, or "
                                                  "their process stopped (marked failed after the claim timeout)")
    loss_micro_per_release: int
    announced_micro: int = Field(description="Loss per release x releases: the feed's allocation")
    spent_micro: int = Field(description="Charged to the feed's allocation so far")
    planned_micro: int = Field(description="What the releases neither produced nor charged yet will charge "
                                           "(a failed release tried again is charged again, on top)")
    next_release_at: datetime | None = Field(description="The first announced release time after now not "
                                                         "released yet (a steward may release a period early)")
    last_refusal: Annotated[dict[str, Any], DocumentAs(FeedRefusal)] | None = Field(description="Period, time and reason of the latest refusal")
    last_failure: Annotated[dict[str, Any], DocumentAs(FeedFailure)] | None = Field(description="Period, charge and fixed reason of the latest "
                                                            "failed release not released since")
    created_at: datetime
    created_by: str | None


class FeedReleaseOut(BaseModel):
    """A produced release (the signed document itself is fetched from ``url``)."""

    feed: str
    number: int
    period: str
    sha256: str
    signature: str
    epsilon: float
    loss_micro: int
    origin: str
    created_at: datetime
    fresh: bool = Field(description="Produced by this request (false: it existed already, nothing was charged)")
    url: str


# -- the documents consumers fetch, for OpenAPI only (the bytes served are the stored, signed ones) --

Scalar = bool | int | float | str | None


class FeedItemExtension(BaseModel):
    number: int
    period: str
    sha256: str = Field(description="SHA-256 of the release's signed bytes (its ETag)")
    signature: str = Field(description="'<key name> <base64 Ed25519 signature>'")
    loss_micro: int
    csv_url: str
    signature_url: str


class FeedItem(BaseModel):
    id: str
    url: str
    title: str
    content_text: str
    date_published: datetime
    civicdp: FeedItemExtension = Field(alias="_civicdp")


class FeedIndexExtension(BaseModel):
    dataset: str
    schedule: str
    cron: str
    releases: int
    loss_micro_per_release: int
    next_release_at: datetime | None
    public_key: str = Field(description="The verifier key of the releases' signatures (note format)")


class FeedIndex(BaseModel):
    """A feed as a JSON Feed 1.1 document (https://jsonfeed.org/version/1.1), newest release first."""

    version: str
    title: str
    home_page_url: str
    feed_url: str
    description: str
    items: list[FeedItem]
    civicdp: FeedIndexExtension = Field(alias="_civicdp")


class FeedTable(BaseModel):
    columns: list[str]
    rows: list[dict[str, Scalar | list[Scalar]]]


class FeedResult(BaseModel):
    query: Annotated[dict[str, Any], DocumentAs(QueryRequest)]
    loss_micro: int
    columns: list[str]
    rows: list[dict[str, Scalar | list[Scalar]]]
    tables: dict[str, FeedTable]
    contributions: int | str
    confidence: Scalar
    mechanisms: list[dict[str, Scalar]]
    notes: list[str]


class FeedReleaseDocument(BaseModel):
    """A release as signed: canonical JSON (numbers that are not whole are written as text)."""

    format: str
    feed: str
    number: int
    releases: int
    period: str
    schedule: str
    dataset: str
    dataset_version: str
    released_at: datetime
    loss: dict[str, Scalar] = Field(description="Pure: epsilon_micro and delta; zCDP: rho_nano, epsilon and delta")
    signed_by: str
    results: list[FeedResult]
