"""The simulated city: AOIs, shops, items (ads) and users, as numpy arrays plus contract tables.

Everything here is static for a run, shops that open late included (their rows exist from the start; the
engine keeps them out of the logs until their opening day). What changes over time (habits, recent
interests) lives in the behaviour engine. The items' creatives are drawn by `render` from these arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features import contract, geohash
from features.contract import AoiType, MealSlot
from features.simulator.config import ShopConfig, SimConfig

M_PER_DEG_LAT = 111_320.0

# City-wide taste profile: how much each of 12 categories is wanted in each meal slot.
# Categories: congee/buns, noodles, rice bowls, fast food, milk tea, coffee, skewers/BBQ, hotpot,
# salad, fruit, bakery/dessert, home-style dishes.
SLOT_CATEGORY_PROFILE = np.array([
    # con  noo  ric  fst  tea  cof  bbq  hot  sal  fru  bak  hom
    [6.0, 2.0, 0.3, 1.0, 0.5, 3.0, 0.0, 0.0, 0.3, 0.5, 2.5, 0.2],  # breakfast
    [0.5, 3.0, 4.0, 2.5, 0.8, 0.8, 0.3, 0.8, 1.5, 0.3, 0.3, 3.5],  # lunch
    [0.2, 0.5, 0.2, 1.0, 5.0, 3.0, 0.3, 0.1, 0.5, 2.0, 3.0, 0.2],  # afternoon tea
    [0.3, 2.5, 3.0, 2.0, 0.8, 0.2, 1.5, 3.0, 1.0, 0.5, 0.3, 4.0],  # dinner
    [0.5, 2.0, 0.5, 2.5, 1.5, 0.2, 5.0, 1.5, 0.1, 1.0, 0.8, 0.5],  # night
])
CATEGORY_PRICE = np.array([12, 22, 28, 30, 18, 24, 45, 80, 32, 25, 20, 35], dtype=np.float64)


def slot_category_profile(categories: int, rng: np.random.Generator) -> np.ndarray:
    """(slots, categories) weights; beyond the 12 named categories, random profiles."""
    if categories <= SLOT_CATEGORY_PROFILE.shape[1]:
        profile = SLOT_CATEGORY_PROFILE[:, :categories]
    else:
        extra = rng.gamma(0.6, 1.5, size=(len(MealSlot), categories - SLOT_CATEGORY_PROFILE.shape[1]))
        profile = np.concatenate([SLOT_CATEGORY_PROFILE, extra], axis=1)
    profile = profile + 0.05  # nothing is never eaten
    return profile / profile.sum(axis=1, keepdims=True)


def category_prices(categories: int, rng: np.random.Generator) -> np.ndarray:
    base = CATEGORY_PRICE[: min(categories, len(CATEGORY_PRICE))]
    extra = rng.uniform(15, 60, size=max(0, categories - len(CATEGORY_PRICE)))
    return np.concatenate([base, extra])


def open_days(sc: ShopConfig, days: int, rng: np.random.Generator) -> np.ndarray:
    """The day each shop opens: 0 for most; `new_share` open later, `new_recent_share` of those within the
    last `new_recent_days` days and the rest on a uniform day 1..days-1 (none when the run is one day)."""
    n = sc.shops
    late = rng.uniform(size=n) < sc.new_share
    recent = rng.uniform(size=n) < sc.new_recent_share
    if days < 2:
        return np.zeros(n, dtype=np.int64)
    first_recent = max(1, days - sc.new_recent_days)
    day = np.where(recent, rng.integers(first_recent, days, n), rng.integers(1, days, n))
    return np.where(late, day, 0).astype(np.int64)


def offset_points(lat: np.ndarray, lon: np.ndarray, dx_m: np.ndarray, dy_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move points by metres east (dx) and north (dy)."""
    new_lat = lat + dy_m / M_PER_DEG_LAT
    new_lon = lon + dx_m / (M_PER_DEG_LAT * np.cos(np.radians(lat)))
    return new_lat, new_lon


@dataclass
class World:
    config: SimConfig
    slot_profile: np.ndarray  # (slots, categories)
    category_price: np.ndarray  # (categories,) the typical price of a category
    # AOIs
    aoi_lat: np.ndarray
    aoi_lon: np.ndarray
    aoi_type: np.ndarray
    aoi_district: np.ndarray
    aoi_radius_m: np.ndarray
    aoi_local_shops: np.ndarray  # (aois, local_shops) shop indices, nearest first
    # shops (index = shop_id - 1)
    shop_lat: np.ndarray
    shop_lon: np.ndarray
    shop_aoi: np.ndarray
    shop_category: np.ndarray
    shop_brand: np.ndarray
    shop_price: np.ndarray
    shop_quality: np.ndarray  # latent, never written
    shop_appeal: np.ndarray  # latent, standard normal, never written: only the shop's creatives show it
    shop_open_day: np.ndarray  # the simulated day the shop opens (0: open from the start); never written
    shop_open: np.ndarray  # (shops, slots) bool
    shop_item_start: np.ndarray
    shop_item_count: np.ndarray
    shop_geohash_6: pa.Array
    # items (index = item_id - 1); the first item of every shop is its ad
    item_shop: np.ndarray
    item_price: np.ndarray
    item_bid: np.ndarray
    # users (index = user_id - 1)
    user_places: np.ndarray  # (users, 3) AOI index of home, work, third place
    user_place_lat: np.ndarray  # (users, 3)
    user_place_lon: np.ndarray
    user_taste: np.ndarray  # (users, slots, categories), rows sum to 1
    user_price: np.ndarray  # preferred price
    user_price_sensitivity: np.ndarray
    user_loyalty: np.ndarray
    user_sessions_per_day: np.ndarray
    user_gender: np.ndarray
    user_vip: np.ndarray
    user_has_work: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.user_places.shape[0])

    def tables(self) -> dict[str, pa.Table]:
        """The world as contract tables."""
        c = self.config.city
        n_aoi, n_shop = self.aoi_lat.size, self.shop_lat.size
        aoi_ids = np.arange(1, n_aoi + 1, dtype=np.int64)
        aoi_gh6 = geohash.encode(self.aoi_lat, self.aoi_lon, 6)
        shop_district = self.aoi_district[self.shop_aoi]
        home_aoi, work_aoi = self.user_places[:, 0], self.user_places[:, 1]
        user_work_gh6 = geohash.encode(self.user_place_lat[:, 1], self.user_place_lon[:, 1], 6)
        tables = {
            "aois": {
                "aoi_id": aoi_ids, "aoi_type": self.aoi_type, "city_id": np.full(n_aoi, c.city_id),
                "district_id": self.aoi_district + 1, "lat": self.aoi_lat, "lon": self.aoi_lon,
                "geohash_6": aoi_gh6, "radius_m": self.aoi_radius_m,
            },
            "shops": {
                "shop_id": np.arange(1, n_shop + 1), "brand_id": self.shop_brand + 1,
                "category_1_id": self.shop_category + 1, "city_id": np.full(n_shop, c.city_id),
                "district_id": shop_district + 1, "shop_aoi_id": self.shop_aoi + 1,
                "shop_geohash_6": self.shop_geohash_6,
                "shop_geohash_12": geohash.encode(self.shop_lat, self.shop_lon, 12),
                "lat": self.shop_lat, "lon": self.shop_lon, "avg_price": self.shop_price,
                "open_slots": (self.shop_open * (1 << np.arange(len(MealSlot)))).sum(axis=1),
            },
            "items": {
                "item_id": np.arange(1, self.item_shop.size + 1), "shop_id": self.item_shop + 1,
                "price": self.item_price, "bid": self.item_bid,
            },
            "users": {
                "user_id": np.arange(1, self.n_users + 1), "gender": self.user_gender,
                "is_super_vip": self.user_vip, "visit_city": np.full(self.n_users, c.city_id),
                "avg_price": self.user_price, "home_aoi_id": home_aoi + 1,
                "work_aoi_id": pa.array(work_aoi + 1, mask=~self.user_has_work),
                "home_geohash_6": geohash.encode(self.user_place_lat[:, 0], self.user_place_lon[:, 0], 6),
                "work_geohash_6": pa.array(user_work_gh6, mask=~self.user_has_work),
            },
        }
        return {name: contract.to_table(contract.TABLES[name], cols) for name, cols in tables.items()}


def _uniform_disc(rng: np.random.Generator, n: int, radius_m: float) -> tuple[np.ndarray, np.ndarray]:
    r = radius_m * np.sqrt(rng.uniform(size=n))
    theta = rng.uniform(0, 2 * np.pi, size=n)
    return r * np.cos(theta), r * np.sin(theta)


def build_world(config: SimConfig) -> World:
    rng = np.random.default_rng([config.seed, 0])
    city, sc, uc = config.city, config.shops, config.users
    n_slots = len(MealSlot)
    profile = slot_category_profile(sc.categories, rng)

    # AOIs: denser towards the centre (half within a third of the radius).
    n_aoi = city.aois
    core = rng.uniform(size=n_aoi) < 0.5
    dx, dy = _uniform_disc(rng, n_aoi, city.radius_km * 1000)
    dx, dy = np.where(core, dx / 3, dx), np.where(core, dy / 3, dy)
    aoi_lat, aoi_lon = offset_points(np.full(n_aoi, city.lat), np.full(n_aoi, city.lon), dx, dy)
    aoi_type = rng.choice(len(AoiType), size=n_aoi, p=np.asarray(city.aoi_type_shares) / sum(city.aoi_type_shares))
    aoi_type[: len(AoiType)] = np.arange(len(AoiType))  # every type exists at least once
    aoi_type = aoi_type.astype(np.int8)
    angle = np.arctan2(dy, dx)
    aoi_district = (((angle + np.pi) / (2 * np.pi) * city.districts).astype(np.int64)) % city.districts
    aoi_radius = np.select([aoi_type == AoiType.RESIDENTIAL, aoi_type == AoiType.OFFICE], [400.0, 250.0], 600.0).astype(np.float32)

    # Shops cluster around AOIs; offices and campuses attract more of them.
    n_shop = sc.shops
    attract = np.select([aoi_type == AoiType.RESIDENTIAL, aoi_type == AoiType.OFFICE], [1.0, 2.0], 1.5)
    shop_aoi = rng.choice(n_aoi, size=n_shop, p=attract / attract.sum())
    sdx, sdy = rng.normal(0, sc.spread_m, size=(2, n_shop))
    shop_lat, shop_lon = offset_points(aoi_lat[shop_aoi], aoi_lon[shop_aoi], sdx, sdy)
    cat_share = profile.mean(axis=0)
    shop_category = rng.choice(sc.categories, size=n_shop, p=cat_share / cat_share.sum())
    brand_category = rng.integers(0, sc.categories, size=sc.brands)
    brand_category[: sc.categories] = np.arange(sc.categories)
    brand_pop = 1.0 / np.arange(1, sc.brands + 1) ** 0.8  # chains: a few big brands
    shop_brand = np.empty(n_shop, dtype=np.int64)
    for cat in range(sc.categories):  # loop over categories, not rows
        members = np.flatnonzero(shop_category == cat)
        brands = np.flatnonzero(brand_category == cat)
        shop_brand[members] = rng.choice(brands, size=members.size, p=brand_pop[brands] / brand_pop[brands].sum())
    category_price = category_prices(sc.categories, rng)
    shop_price = (category_price[shop_category] * rng.lognormal(0, 0.35, n_shop)).astype(np.float32)
    shop_quality = rng.normal(0, 0.5, n_shop)
    affinity = profile[:, shop_category].T / profile.max(axis=0)[shop_category][:, None]  # (shops, slots) in [0,1]
    shop_open = rng.uniform(size=(n_shop, n_slots)) < 0.15 + 0.85 * affinity
    shop_open[:, MealSlot.LUNCH] |= ~shop_open.any(axis=1)

    # Items: the first item of each shop is the one it advertises.
    item_count = 1 + rng.poisson(max(sc.items_per_shop - 1, 0), n_shop)
    item_start = np.concatenate([[0], np.cumsum(item_count)[:-1]])
    item_shop = np.repeat(np.arange(n_shop), item_count)
    item_price = (shop_price[item_shop] * rng.lognormal(0, 0.25, item_shop.size)).astype(np.float32)
    shop_bid = np.exp(np.log(sc.bid_median) + sc.bid_sigma * rng.normal(size=n_shop))
    item_bid = (shop_bid[item_shop] * rng.lognormal(0, 0.1, item_shop.size)).astype(np.float32)

    # Local shop sets: the nearest shops to each AOI's centre.
    k = min(config.behaviour.local_shops, n_shop)
    d = geohash.haversine_m(aoi_lat[:, None], aoi_lon[:, None], shop_lat[None, :], shop_lon[None, :])
    local = np.argsort(d, axis=1, kind="stable")[:, :k]

    # Users: home (residential, or campus for students), work (office/campus), a third place.
    n_user = uc.users
    by_type = [np.flatnonzero(aoi_type == t) for t in AoiType]
    student = rng.uniform(size=n_user) < uc.student_share
    home = np.where(student, rng.choice(by_type[AoiType.CAMPUS], n_user), rng.choice(by_type[AoiType.RESIDENTIAL], n_user))
    work = np.where(student, home, rng.choice(by_type[AoiType.OFFICE], n_user))
    has_work = student | (rng.uniform(size=n_user) >= uc.no_work_share)
    work = np.where(has_work, work, home)
    third = rng.integers(0, n_aoi, n_user)
    places = np.stack([home, work, third], axis=1)
    pdx, pdy = _uniform_disc(rng, places.size, 1.0)
    radius = aoi_radius[places].ravel()
    place_lat, place_lon = offset_points(aoi_lat[places].ravel(), aoi_lon[places].ravel(), pdx * radius, pdy * radius)
    place_lat, place_lon = place_lat.reshape(n_user, 3), place_lon.reshape(n_user, 3)
    # Dirichlet around the city's profile: a personal taste per meal slot
    taste = rng.gamma(uc.taste_concentration * profile[None, :, :] + 0.05, 1.0, size=(n_user, n_slots, sc.categories))
    taste /= taste.sum(axis=2, keepdims=True)
    user_price = (np.median(shop_price) * rng.lognormal(0, 0.3, n_user)).astype(np.float32)
    events_per_day = uc.events_per_year_median / 365.0 * rng.lognormal(0, uc.activity_sigma, n_user)
    b = config.behaviour
    events_per_session = 1 + b.clicks_per_session + b.explore_prob + b.order_prob
    # a stream of its own: the attributes above stay what they were before shops had these
    late = np.random.default_rng([config.seed, 2])
    shop_appeal = late.normal(size=n_shop)
    return World(
        config=config, slot_profile=profile, category_price=category_price,
        aoi_lat=aoi_lat, aoi_lon=aoi_lon, aoi_type=aoi_type, aoi_district=aoi_district,
        aoi_radius_m=aoi_radius, aoi_local_shops=local,
        shop_lat=shop_lat, shop_lon=shop_lon, shop_aoi=shop_aoi, shop_category=shop_category,
        shop_brand=shop_brand, shop_price=shop_price, shop_quality=shop_quality, shop_appeal=shop_appeal,
        shop_open_day=open_days(sc, config.days, late), shop_open=shop_open,
        shop_item_start=item_start, shop_item_count=item_count,
        shop_geohash_6=pa.array(geohash.encode(shop_lat, shop_lon, 6)),
        item_shop=item_shop, item_price=item_price, item_bid=item_bid,
        user_places=places, user_place_lat=place_lat, user_place_lon=place_lon, user_taste=taste,
        user_price=user_price, user_price_sensitivity=rng.gamma(4.0, 0.25, n_user),
        user_loyalty=rng.gamma(4.0, 0.25, n_user),
        user_sessions_per_day=events_per_day / events_per_session,
        user_gender=rng.integers(0, 3, n_user).astype(np.int8),
        user_vip=(rng.uniform(size=n_user) < 0.15).astype(np.int8),
        user_has_work=has_work,
    )
