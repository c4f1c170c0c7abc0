"""Arrow schemas of the four tables (DESIGN.md "Tables").

Ids are stored as strings whatever the source used; vocabularies (features/) map them to dense
ints. Optional feature columns follow a naming convention so every stage can find them:
``cat_*`` are categorical (string) and ``num_*`` numeric (float32) features of pins or users.
"""

from __future__ import annotations

import pyarrow as pa

TABLES = ("engagements", "pins", "users", "interests")

# Closed action set, in rising value; hide is the negative action.
ACTIONS = ("impression", "closeup", "click", "save", "hide")
POSITIVE_ACTIONS = ("closeup", "click", "save")
SURFACES = ("homefeed", "search", "related", "other")

TS = pa.timestamp("us", tz="UTC")

ENGAGEMENTS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("pin_id", pa.string(), nullable=False),
        pa.field("ts", TS, nullable=True),  # null only for sources without time (adjacency splits)
        pa.field("action", pa.string(), nullable=False),
        pa.field("weight", pa.float32(), nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("condition_interest", pa.string(), nullable=True),
    ]
)

PINS = pa.schema(
    [
        pa.field("pin_id", pa.string(), nullable=False),
        pa.field("image_sig", pa.string(), nullable=False),
        pa.field("image_sig_coarse", pa.string(), nullable=False),
        pa.field("interests", pa.list_(pa.string()), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=True),
        # when the pin was created; null: the features use its first visible engagement instead
        pa.field("created_at", TS, nullable=True),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("followed_interests", pa.list_(pa.string()), nullable=False),
    ]
)

INTERESTS = pa.schema(
    [
        pa.field("interest_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("parent_id", pa.string(), nullable=True),
    ]
)

# what a source's pins.created_at holds (its manifest says which): sources without a creation time
# get the first engagement *as of* each example's or bundle's time (features/age.py), never stored
FIRST_ENGAGEMENT = "first visible engagement (computed as of each example's or bundle's time)"
NO_TIME = "none: the source has no timestamps, so there is no age feature"

SCHEMAS: dict[str, pa.Schema] = {
    "engagements": ENGAGEMENTS,
    "pins": PINS,
    "users": USERS,
    "interests": INTERESTS,
}

# Tables whose rows may carry extra cat_*/num_* feature columns.
FEATURE_TABLES = ("pins", "users")


def feature_columns(schema: pa.Schema) -> tuple[list[str], list[str]]:
    """Categorical and numeric feature column names of a pins/users schema."""
    cats = [n for n in schema.names if n.startswith("cat_")]
    nums = [n for n in schema.names if n.startswith("num_")]
    return cats, nums


def full_schema(table: str, extra: pa.Schema | None = None) -> pa.Schema:
    """The table's schema plus its cat_*/num_* columns (strings and float32)."""
    base = SCHEMAS[table]
    if extra is None or table not in FEATURE_TABLES:
        return base
    fields = list(base)
    for name in extra.names:
        if name.startswith("cat_"):
            fields.append(pa.field(name, pa.string(), nullable=True))
        elif name.startswith("num_"):
            fields.append(pa.field(name, pa.float32(), nullable=True))
    return pa.schema(fields)
