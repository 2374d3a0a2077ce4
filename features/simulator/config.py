"""Typed configuration of the log simulator. Every knob has a default; files override any subset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.configfile import load_config


@dataclass(frozen=True)
class CityConfig:
    city_id: int = 1
    name: str = "Shanghai"
    lat: float = 31.2304
    lon: float = 121.4737
    utc_offset_hours: float = 8.0
    radius_km: float = 9.0
    districts: int = 8
    aois: int = 150
    # shares of residential, office and campus AOIs
    aoi_type_shares: tuple[float, float, float] = (0.6, 0.3, 0.1)


@dataclass(frozen=True)
class ShopConfig:
    shops: int = 1500
    brands: int = 300
    categories: int = 12
    items_per_shop: float = 4.0  # mean
    spread_m: float = 500.0  # shops scatter around the AOI they serve
    bid_median: float = 0.5  # currency per click
    bid_sigma: float = 0.5
    # New shops: a share opens after day 0 (their items exist from the start but are never seen before the
    # opening day). Of those, `new_recent_share` open within the last `new_recent_days` days (so that the
    # last week, the test split, shows ads never shown before) and the rest on a uniform day 1..days-1
    # (so that training has cold starts to learn from). With these defaults, 13.9% of the distinct ads the
    # default city shows in its last week were never shown before it (12.6% and 14.4% with seeds 8 and 9).
    new_share: float = 0.3
    new_recent_share: float = 0.5
    new_recent_days: int = 7


@dataclass(frozen=True)
class UserConfig:
    users: int = 2000
    events_per_year_median: float = 600.0  # heavy tail: lognormal around this median
    activity_sigma: float = 1.0
    student_share: float = 0.1
    no_work_share: float = 0.15
    taste_concentration: float = 6.0  # Dirichlet concentration around the city's meal-slot profile
    place_jitter_m: float = 60.0  # where within their place a user stands at each request


@dataclass(frozen=True)
class BehaviourConfig:
    local_shops: int = 64  # the shops a place can order from (nearest to its AOI)
    clicks_per_session: float = 0.8  # extra clicks on the chosen shop, Poisson mean
    explore_prob: float = 0.3  # a click on a second shop in the session
    order_prob: float = 0.55
    ad_conversion_prob: float = 0.5  # an ad click makes that shop the session's choice
    random_place_prob: float = 0.05  # the user is somewhere unusual (no habits there)
    habit_half_life_days: float = 120.0
    recent_half_life_days: float = 2.0
    # weights of the organic shop choice (softmax over the local shops open in the slot)
    choice_taste: float = 1.0
    choice_price: float = 1.0
    choice_distance_per_km: float = 0.8
    choice_habit: float = 1.2
    choice_recent: float = 0.2
    choice_quality: float = 0.5
    choice_appeal: float = 0.3  # times the shop's hidden appeal (what its creatives show)
    # event weight added to the habit state
    order_weight: float = 1.0
    click_weight: float = 0.3


@dataclass(frozen=True)
class AdConfig:
    request_prob: float = 0.6  # a session opens the ad slot
    candidates: int = 30  # nearby ads per request
    slots: int = 5  # shown per request
    logging_epsilon: float = 0.3  # logging policy: uniform random ranking with this probability
    examination: tuple[float, ...] = (1.0, 0.8, 0.66, 0.56, 0.5)  # P(looked at) per position


@dataclass(frozen=True)
class ClickModelConfig:
    """Weights of the true click logit. The habit terms are the lifelong spatial-temporal signal."""

    bias: float = -3.0
    taste: float = 0.8  # log of the user's taste for the category in this meal slot (x categories)
    price: float = 1.0  # times price sensitivity times |log(price / preferred price)|
    distance_per_km: float = 0.6
    habit_shop: float = 1.1  # log1p(history with this shop at this place in this meal slot)
    habit_category: float = 0.4  # log1p(history with this category at this place in this meal slot)
    recent: float = 0.3  # log1p(category interest of the last few days)
    quality: float = 0.5
    appeal: float = 0.8  # times the shop's hidden appeal, standard normal; only its creatives show it


@dataclass(frozen=True)
class SimConfig:
    seed: int = 7
    days: int = 120
    start_date: str = "2026-03-02"
    chunk_users: int = 4000  # users simulated together; bounds memory
    workers: int = 1  # processes simulating chunks in parallel
    city: CityConfig = field(default_factory=CityConfig)
    shops: ShopConfig = field(default_factory=ShopConfig)
    users: UserConfig = field(default_factory=UserConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    ads: AdConfig = field(default_factory=AdConfig)
    click: ClickModelConfig = field(default_factory=ClickModelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_sim_config(path: str | Path | None = None, **overrides: Any) -> SimConfig:
    """Defaults, then a YAML/JSON file, then explicit overrides (dotted keys allowed: 'users.users';
    None: not given). Unknown keys and wrong types are a ConfigError (a ValueError)."""
    return load_config(SimConfig, path, overrides)
