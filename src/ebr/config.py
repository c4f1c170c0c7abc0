"""Typed run configuration: one YAML file, parsed into pydantic models (DESIGN.md "Configuration").

Every choice marked [ours] in TECHNIQUES.md is a field with a default here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ebr.errors import EbrError

# the per-dataset choices switched off: a config trained as given (`ebr train --no-choose`; tuning
# trials; benchmarks and tests that compare other things)
NO_CHOICE = {"train.choose_pin_id": False, "train.choose_recency_days": [], "train.choose_regularised": False}

# the settings train.choose_regularised tries on ids-only data
REGULARISED = {"train.mixed_negatives": 1024, "model.dropout": 0.2}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a YAML key is an error, not a silent default


class DataConfig(_Section):
    split: str | None = None  # default: the given split when the import had one, else temporal
    # a given split's validation rows (10% of each user's training rows): random (seeded by
    # train.seed), last (each user's last rows in file order; the file order then counts as time),
    # or auto: last where the lines are in engagement order (features/examples.py line_order: not
    # sorted, and consecutive items recur across users beyond a shuffled baseline), as such a
    # file's test is each user's last rows; else random. A resumed checkpoint must match
    given_validation: Literal["auto", "random", "last"] = "auto"
    # ID pretraining (pretrain/windows.py): the older share of the training part is the pretraining
    # window, the recent rest trains a retrieval model with ID embeddings (data without time: a
    # seeded partition of the training pairs, drawn with id_pretrain_seed)
    id_pretrain_fraction: float = Field(0.7, gt=0.0, lt=1.0)
    id_pretrain_seed: int = 0
    # data without time: the pretraining side is a seeded random share of each user's training pairs
    # (random), or each user's older share in pseudo-time, the file order (file_order); auto:
    # file_order where the lines are in engagement order (data.given_validation resolves last: the
    # file order is then each user's time), else random
    id_partition: Literal["auto", "random", "file_order"] = "auto"
    # a model without IDs trained on that recent share only, as a model with IDs is (an ablation:
    # it separates the effect of the window from the effect of the IDs)
    recent_only: bool = False


class PretrainConfig(_Section):
    """`ebr pretrain-ids`: contrastive user and pin ID tables (TECHNIQUES.md 4)."""

    dim: int = Field(64, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1024, ge=2)  # the global batch (every rank's rows together)
    lr: float = Field(0.05, gt=0.0)  # row-wise Adagrad, fused into the backward pass (fbgemm TBE)
    temperature: float = Field(0.1, gt=0.0)
    # uniform corpus negatives: one per row of the batch, shared by every row, with their logQ
    uniform_negatives: bool = True
    init_std: float = Field(0.1, gt=0.0)
    sharding: Literal["table_wise", "column_wise"] = "table_wise"  # TorchRec plan (CPU: no row-wise)


class FeaturesConfig(_Section):
    history_len: int = 50
    # a training example's history: the user's last history_len events before the example's time
    # (example), or as of the end of the visible data with the target's own events left out (end:
    # the history evaluation and serving read); auto: end where the data has no real time (a given
    # split's file order is no time, and its held-out rows need not be the latest), else example
    history_as_of: Literal["auto", "example", "end"] = "auto"
    positive_actions: list[str] = ["closeup", "click", "save"]
    # training weight per positive action [ours]
    action_weights: dict[str, float] = {"closeup": 1.0, "click": 1.5, "save": 2.0}
    # per-pin engagement counts (closeup/click/save x windows) as pin-tower features, point in time
    pin_stats: bool = False  # measured to hurt recall on synth small and ML-100K (README)
    stats_granularity: Literal["coarse", "fine", "pin"] = "coarse"  # coarse = the serving corpus's
    stats_windows_days: list[int] = [7, 30, 90]
    # interests as features: a bag of each pin's interests in the pin tower, a bag of the user's
    # followed interests in the user tower, one interest table for both
    interest_features: bool = True
    max_interests: int = 8  # per pin and per user (the first ones)
    # the time term (model/towers.py), read as of each example's time in training and as of the
    # bundle's time in serving; no effect on data without timestamps:
    pin_age: bool = True  # the pin's age bucket (features/age.py)
    pin_counts: bool = True  # its positive engagements in whole days before t (coarse signature)
    count_windows_days: list[int] = [1, 7, 30]
    # the time since the user's last engagement (the pin-age buckets of features/age.py) as one more
    # user categorical field: as of each example's time in training, as of the bundle's time in
    # serving. auto: on under a temporal split of data with timestamps (requests come after the
    # bundle's time, as in the test window: validation recall rose on temporal ML-100K, within
    # noise on the synthetic world), off under leave_last_out (each user's next engagement comes
    # at its own time, not the bundle's: validation recall fell) and on data without time
    # (README, Training: "Time since the last engagement")
    user_gap: Literal["auto", "on", "off"] = "auto"


class MaskNetConfig(_Section):
    blocks: int = 4  # parallel MaskBlocks
    q: int = 128  # block output width (KDD'25 appendix: 128)
    ratio: float = 0.5  # mask hidden width = ratio * input width
    bottleneck: int = 256  # [ours] the bottleneck MLP: 4q -> bottleneck -> out
    variant: Literal["pinterest", "original"] = "pinterest"
    activation: Literal["relu", "gelu"] = "relu"  # [ours]


class DHENConfig(_Section):
    # [ours] order per the blog: [MLP || MaskNet] -> [MLP || field transformer]
    levels: list[list[Literal["mlp", "masknet", "transformer"]]] = [["mlp", "masknet"], ["mlp", "transformer"]]
    width: int = 256
    ensemble: Literal["sum", "concat"] = "sum"
    mlp_hidden: int = 512
    token_dim: int = 32
    transformer_layers: int = 2
    heads: int = 4


class MultiConfig(_Section):
    """Multi-embedding users (model/interests.py; TECHNIQUES.md section 6)."""

    k_max: int = Field(7, ge=1, le=32)
    # K from the valid history length L: log2 = clamp(ceil(log2 L), 1, k_max); fixed = fixed_k
    k_rule: Literal["log2", "fixed"] = "log2"
    fixed_k: int = Field(4, ge=1)
    iterations: int = Field(3, ge=1)  # routing iterations [ours; MIND and ComiRec use 3]
    init: Literal["maxmin", "random"] = "maxmin"  # capsule centres (random: MIND's; an ablation)
    assignment: Literal["single", "soft"] = "single"  # capsule routing (soft: an ablation)
    # a cluster no history item was routed to is no embedding [ours]; off: validation recall@100
    # 0.2445 with empty clusters kept vs 0.2399 dropped (small world, seed 0; README)
    drop_empty: bool = False
    dim: int = 32  # width of the summarised items and cluster vectors
    # serving: each embedding's share of the k results, equal or proportional to importance [ours]
    budget: Literal["equal", "importance"] = "equal"


class ModelConfig(_Section):
    dim: int = 64  # output embedding width
    id_dim: int = 32  # pin-ID embedding width
    cat_dim: int = 16  # per categorical field
    field_dim: int = 32  # numeric MLP, content projection, history outputs
    hidden: list[int] = [256]  # MLP crossing widths
    crossing: Literal["mlp", "masknet", "dhen"] = "mlp"  # both towers, unless overridden below
    user_crossing: Literal["mlp", "masknet", "dhen"] | None = None
    pin_crossing: Literal["mlp", "masknet", "dhen"] | None = None
    # input normalisation of every crossing block: a LayerNorm per feature field, one over the
    # concatenated fields, or none (re-checked on another world's seed: benchmarks/defaults.py)
    input_norm: Literal["field", "global", "none"] = "field"
    masknet: MaskNetConfig = Field(default_factory=MaskNetConfig)
    dhen: DHENConfig = Field(default_factory=DHENConfig)
    use_pin_id: bool = True
    # pins with fewer training positives than this read one shared ID row (OOV) instead of their own
    # (ItemEncoder.share_rare_ids); 1: every pin its own ID
    pin_id_min_count: int = Field(1, ge=1)
    # element-wise dropout on the jointly learned pin-ID embeddings while training (pretrained ones
    # use id_dropout)
    pin_id_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_content: bool = True
    use_user_id: bool = False  # learned user-ID embeddings overfit (TECHNIQUES.md 1): off by default
    # pretrained user and pin ID tables from an `ebr pretrain-ids` snapshot (replace the jointly
    # learned ID tables above; their width is the snapshot's): frozen (the seed's recipe) or
    # finetune (an ablation); element-wise dropout on the ID embeddings while training
    id_embeddings: Literal["none", "frozen", "finetune"] = "none"
    id_dropout: float = Field(0.5, ge=0.0, lt=1.0)
    # one user embedding, or K from clustering the history: capsule (KDD'25 differentiable
    # clustering), mind (random init, soft routing), self_attention (ComiRec-SA)
    user_embeddings: Literal["single", "capsule", "mind", "self_attention"] = "single"
    multi: MultiConfig = Field(default_factory=MultiConfig)
    # conditional retrieval (RecSys'24): an interest id is one more early-fused field of the user
    # tower; trained with the engagement's condition (train.condition_source), served with an
    # interest filter per condition (mode conditional / auto)
    conditional: bool = False
    time_dim: int = 8  # width of the time term's pin embedding (features.pin_age, features.pin_counts)
    # the time term starts as a popularity prior (TwoTower.init_time_prior): the mean log recent
    # count over the count windows added to every score at step 0, instead of a zero term
    time_prior: bool = False
    # a learned scalar per pin added to every score, b_i = a linear head on the pin tower's crossing
    # output (before the unit norm): the popularity a unit-norm embedding can only hold as a
    # direction; served as one more index column (tau * b_i) against a constant 1 in the query
    pin_bias: bool = False
    # a learned embedding per history slot (events back from the most recent) added to each history
    # item before pooling, so the poolings can weigh recent engagements up: auto = on where the split
    # asks for each user's next engagement (leave_last_out) with point-in-time training histories,
    # off under temporal splits and where histories are read at the end of the data (chosen on
    # validation: train/loop.py history_positions; README)
    history_position: Literal["auto", "on", "off"] = "auto"
    temperature: float = 0.05  # [ours] Yi et al.: 0.05-0.07 with normalised embeddings
    dropout: float = 0.0


class TrainConfig(_Section):
    seed: int = 0
    # the epoch cap; None: 8, raised on small data until the epochs allow min_steps steps (early
    # stopping still ends a run whose validation recall stops improving)
    epochs: int | None = Field(None, ge=1)
    min_steps: int = Field(4000, ge=0)
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.0
    # Adam as one fused kernel over all parameters (the same update; PyTorch's per-tensor loop when
    # off, the earlier default: 2.5x slower on the small world's 2M parameters)
    fused_adam: bool = True
    logq: bool = True
    # exact: p_j = 1 - (1 - n_j/N)^B from the training counts (random batches); streaming: Yi et
    # al.'s estimator (for data that arrives as a stream, or time-local batches)
    logq_estimator: Literal["exact", "streaming"] = "exact"
    # another row's positive is no negative for a row of the same user (the user engaged with it:
    # a false negative, in the row's history or its future)
    mask_same_user: bool = False
    # each training row's history items are left out at random with this probability (drawn per
    # step): an input dropout, as denoising autoencoders for collaborative filtering use
    history_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    mixed_negatives: int = 0  # extra uniform corpus negatives per batch (0 = in-batch only)
    # the training horizon (PinnerFormer's dense all-action idea): each example's history is read as
    # of an earlier engagement of its user, 0..horizon-1 events before the target (drawn per step),
    # so the tower learns what the user engages with next and later, not only next; 1 = next only.
    # Point-in-time histories only (features.history_as_of end reads every history at the end)
    horizon: int = Field(1, ge=1)
    # batches of examples close in time (blocks of the time-sorted examples, in shuffled order):
    # in-batch negatives then carry statistics of the same moment as the row's positive [ours]
    time_local_batches: bool = False
    # recency weighting: each training example's loss weight times 2^(-age / half-life), its age
    # measured back from the last visible engagement (the refit's: the end of validation), the
    # weights rescaled to mean 1 so the step size is unchanged; None: every example counts the
    # same. Data without real time (pseudo-time, given splits) ignores it, with a warning
    recency_half_life_days: float | None = Field(None, gt=0.0)
    # user weighting: each example's loss weight times n_u^-power (n_u: its user's training examples),
    # rescaled to mean 1; 0 = every example counts the same (heavy users dominate the loss), 1 = every
    # user counts the same, as evaluation averages recall per user (Covington et al. 2016 cap examples
    # per user for the same reason)
    user_weight_power: float = Field(0.0, ge=0.0, le=1.0)
    # returning-user weighting: each example within a day of its user's first training example
    # (the sign-up session) weighs this much against a later one (a returning user's), rescaled to
    # mean 1; 1 = no change. Data with real time only (ignored, with a warning, elsewhere)
    first_day_weight: float = Field(1.0, gt=0.0)
    estimator_alpha: float = 0.01
    estimator_hashes: int = 2
    estimator_buckets: int = 1 << 20
    patience: int = 2  # epochs without a better validation recall before stopping
    # at an epoch's end without a better validation recall (training going on, past
    # stop_after_steps), the learning rate is multiplied by this; the refit repeats each decay at the
    # same step. 1 = a constant rate
    lr_plateau_factor: float = Field(1.0, gt=0.0, le=1.0)
    # early stopping ends no run before this many steps: a slow start is no reason to stop (on data
    # without time, validation recall sits at the popularity feed's for 3-4 epochs of ML-100K ids-only
    # before it climbs; patience 2 ended 2 of 72 such runs of a validation sweep there: README)
    stop_after_steps: int = Field(1000, ge=0)
    # validations inside the first epoch as well, at k / (n + 1) of it (selection only): on small
    # data an epoch is a long stretch, and the best model can lie inside the first one (temporal
    # ML-100K: validation 0.39 at 50-75 of its 106 steps, 0.33 at the epoch's end). They can
    # select a step and save best.pt; patience still counts whole epochs.
    first_epoch_checks: int = Field(3, ge=0)
    # settings chosen per dataset on validation (`ebr train --no-choose`: off): selection also trains
    # the model without pin IDs (skipped when pins have no other field, or with pretrained IDs) and,
    # on data with real time, with each of these recency half-lives (days), in every combination,
    # and keeps the best validation recall (summary.json "choice"). Trend-driven data favours
    # content over IDs and recent examples; taste-driven data IDs and the whole history
    choose_pin_id: bool = True
    choose_recency_days: list[Annotated[float, Field(gt=0.0)]] = [7.0]
    # on ids-only data (pins with no field but the ID, so no pin-ID choice) selection also trains
    # with REGULARISED (1,024 uniform corpus negatives per batch and dropout 0.2: the best ids-only
    # setting on validation in benchmarks/val_sweep.py), in combination with the recency choice.
    # On by default since training histories on data without time are read at the end
    # (features.history_as_of): validation chose it in 6 of 6 ML-100K ids-only runs (README
    # "Settings chosen per dataset"); before, with file-order prefixes, its test fell
    choose_regularised: bool = True
    # an alternative is kept only where its validation recall beats the run's own settings by more
    # than this many standard errors of the per-user paired difference (after the one-standard-error
    # rule, the run's own settings as the default): a choice needs evidence, not a lucky draw of a
    # small validation window (temporal ML-100K: 96 users, a standard error near 0.03; README "A
    # choice needs evidence"). The best alternative that passes is kept; 0 = the best validation
    # recall, whatever the margin
    choose_margin: float = Field(1.0, ge=0.0)
    # after selection, retrain on training + validation for the selected number of steps; bundles
    # serve that model (checkpoints/refit.pt); best.pt, the selected one, is kept
    refit: bool = True
    val_users: int = 2000  # sampled validation users (recall@100 per epoch)
    max_steps: int | None = None  # stop after this many steps (benchmarks with a fixed budget)
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    checkpoint_every: int = 200  # steps between 'last' checkpoints (resume granularity)
    # conditional models: the training condition is the interest that sourced the engagement when
    # the log has one (logged), else one of the target pin's interests at random; target: always
    # the latter. A share condition_dropout of examples trains with no condition (the implicit
    # embedding the same tower serves in single mode) [ours: 0.2]
    condition_source: Literal["logged", "target"] = "logged"
    condition_dropout: float = Field(0.2, ge=0.0, le=1.0)
    # model.id_embeddings: the snapshot to use (None: the latest whose window ends before the
    # training window), and whether an overlapping one is accepted (ablations; recorded, warned)
    id_snapshot: str | None = None
    allow_overlap: bool = False


class ServeConfig(_Section):
    # mode auto on a conditional bundle: the implicit embedding(s), then one conditioned embedding
    # per followed interest and per inferred interest (the most frequent interests of the history),
    # at most auto_max_interests conditions, merged round-robin [ours]
    auto_inferred: int = Field(3, ge=0)
    auto_max_interests: int = Field(6, ge=0)


class IndexConfig(_Section):
    backend: Literal["exact", "hnsw", "ivfpq"] = "exact"


class EvalConfig(_Section):
    ks: list[int] = [20, 50, 100, 500]
    peers: list[str] = ["popularity", "interest_popular", "als"]


class RunConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict | None = None) -> RunConfig:
        """A YAML file (or the defaults) with dotted overrides; any problem is an EbrError naming
        the file or the field."""
        name = Path(path).name if path else "the defaults"
        try:
            raw = yaml.safe_load(Path(path).read_text()) if path else {}
        except OSError as e:
            raise EbrError(f"config {name}: cannot read it ({e.strerror or type(e).__name__})") from None
        except yaml.YAMLError as e:
            raise EbrError(f"config {name}: not valid YAML ({str(e).splitlines()[0]})") from None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise EbrError(f"config {name}: must be a mapping of sections (data, features, model, train, ...)")
        for dotted, value in (overrides or {}).items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise EbrError(f"--set {dotted}: {p} is not a section")
            node[leaf] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()[:5])
            raise EbrError(f"config {name} with --set overrides: {problems}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)
