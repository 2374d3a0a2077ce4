"""The behaviour engine: one chunk of users lives through every meal slot of every day.

Each (day, meal slot) step is vectorised over the chunk's sessions. A session happens at one of the
user's places (home, work, a third place, or rarely somewhere random), may open the ad slot, and then
orders/clicks organically. The user's state is kept per (place, meal slot): a slowly decaying count of
what they did with each nearby shop and category there. Both the organic shop choice and the true ad
click probability read that state, so re-ordering habits at a place and meal time reach back months,
while the last few days (the `recent` state) matter only a little: this is the lifelong
spatial-temporal signal FIN is built for.

Shops open on their day (`World.shop_open_day`: most from the start, some later, a share of them in the
last week): until then a shop is in no candidate set and no organic choice, so its ads arrive with no
history. Every shop has a hidden appeal, shown only by its creatives (`features.simulator.render`), which
raises both the true click probability of its ads and, less, the organic choice of it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features import contract, geohash
from features.contract import Action, MealSlot
from features.simulator.world import World, offset_points

PLACES = 3  # home, work, third place; state is kept for these
SLOT_SESSION_SHARE = np.array([0.15, 0.35, 0.12, 0.28, 0.10])
# P(home, work, third place) by (weekend, meal slot)
PLACE_PROBS = np.array([
    [[0.75, 0.20, 0.05], [0.12, 0.83, 0.05], [0.15, 0.80, 0.05], [0.72, 0.20, 0.08], [0.88, 0.07, 0.05]],
    [[0.85, 0.03, 0.12], [0.70, 0.05, 0.25], [0.65, 0.05, 0.30], [0.70, 0.04, 0.26], [0.85, 0.02, 0.13]],
])
WEEKEND_ACTIVITY = 1.15


def day_start_ms(start_date: str, day: int, utc_offset_hours: float) -> int:
    """UTC ms of local midnight of `start_date` + `day` days."""
    d = dt.date.fromisoformat(start_date) + dt.timedelta(days=day)
    midnight = dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone(dt.timedelta(hours=utc_offset_hours)))
    return int(midnight.timestamp() * 1000)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gumbel_argmax(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


@dataclass
class ChunkStats:
    behaviours: int = 0
    impressions: int = 0
    ad_candidates: int = 0
    requests: int = 0
    clicks: int = 0


@dataclass
class _Events:
    """Column arrays of behaviours produced in one step (indices into the step's sessions)."""

    session: list[np.ndarray] = field(default_factory=list)
    local_shop: list[np.ndarray] = field(default_factory=list)
    action: list[np.ndarray] = field(default_factory=list)
    delay_s: list[np.ndarray] = field(default_factory=list)

    def add(self, session: np.ndarray, local_shop: np.ndarray, action: int, delay_s: np.ndarray) -> None:
        self.session.append(session)
        self.local_shop.append(local_shop)
        self.action.append(np.full(session.size, action, dtype=np.int8))
        self.delay_s.append(delay_s)

    def arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(x) for x in (self.session, self.local_shop, self.action, self.delay_s))


class ChunkSimulator:
    """Simulates users [lo, hi) of a world over all days, writing one parquet part per date."""

    def __init__(self, world: World, chunk_index: int, lo: int, hi: int, out_dir: Path):
        self.w, self.cfg = world, world.config
        self.chunk, self.lo, self.hi, self.out = chunk_index, lo, hi, out_dir
        self.rng = np.random.default_rng([self.cfg.seed, 1, chunk_index])
        n, m = hi - lo, world.aoi_local_shops.shape[1]
        n_cat = world.slot_profile.shape[1]
        self.habit_shop = np.zeros((n, PLACES, len(MealSlot), m), dtype=np.float32)
        self.habit_cat = np.zeros((n, PLACES, len(MealSlot), n_cat), dtype=np.float32)
        self.recent = np.zeros((n, n_cat), dtype=np.float32)
        self.next_id = {"event": 0, "impression": 0, "request": 0, "candidate": 0}
        self.pending: dict[str, list[pa.Table]] = {"behaviours": [], "impressions": [], "ad_candidates": []}
        self.stats = ChunkStats()

    # ------------------------------------------------------------------ ids
    def _ids(self, kind: str, n: int) -> np.ndarray:
        start = self.next_id[kind]
        self.next_id[kind] += n
        return (np.int64(self.chunk) << 40) + start + np.arange(n, dtype=np.int64)

    # ------------------------------------------------------------------ run
    def run(self, progress=None) -> ChunkStats:
        cfg = self.cfg
        b = cfg.behaviour
        step_decay = np.float32(0.5 ** (1 / len(MealSlot) / b.recent_half_life_days))
        week_decay = np.float32(0.5 ** (7 / b.habit_half_life_days))
        for day in range(cfg.days):
            midnight = day_start_ms(cfg.start_date, day, cfg.city.utc_offset_hours)
            weekday = int(contract.local_time_fields(np.array([midnight]), cfg.city.utc_offset_hours)["weekdays"][0])
            for slot in MealSlot:
                self._step(day, midnight, weekday >= 5, slot)
                self.recent *= step_decay
            if day % 7 == 6:
                self.habit_shop *= week_decay
                self.habit_cat *= week_decay
            self._flush(before_ms=day_start_ms(cfg.start_date, day + 1, cfg.city.utc_offset_hours))
            if progress is not None:
                progress(1)
        self._flush(before_ms=None)
        return self.stats

    # ------------------------------------------------------------------ one meal slot of one day
    def _step(self, day: int, midnight_ms: int, weekend: bool, slot: MealSlot) -> None:
        w, cfg, rng = self.w, self.cfg, self.rng
        b, ads, cm = cfg.behaviour, cfg.ads, cfg.click
        users = np.arange(self.lo, self.hi)
        rate = w.user_sessions_per_day[users] * SLOT_SESSION_SHARE[slot] * (WEEKEND_ACTIVITY if weekend else 1.0)
        su = np.repeat(np.arange(users.size), rng.poisson(rate))  # chunk-local user of each session
        n = su.size
        if n == 0:
            return
        gu = su + self.lo

        # where: one of the user's places, or rarely a random AOI
        place = (rng.uniform(size=(n, 1)) > np.cumsum(PLACE_PROBS[int(weekend), slot])).sum(axis=1)
        place = np.where((place == 1) & ~w.user_has_work[gu], 0, place)
        wander = rng.uniform(size=n) < b.random_place_prob
        aoi = np.where(wander, rng.integers(0, w.aoi_lat.size, n), w.user_places[gu, place])
        # the nearby shops that have opened by today; a session with none (a place where every nearby shop
        # opens later) has nothing to show or order and does not happen
        opened = w.shop_open_day[w.aoi_local_shops[aoi]] <= day
        some = opened.any(axis=1)
        if not some.all():
            su, gu, place, wander, aoi, opened = su[some], gu[some], place[some], wander[some], aoi[some], opened[some]
            n = su.size
            if n == 0:
                return
        base_lat = np.where(wander, w.aoi_lat[aoi], w.user_place_lat[gu, place])
        base_lon = np.where(wander, w.aoi_lon[aoi], w.user_place_lon[gu, place])
        jitter = np.where(wander, w.aoi_radius_m[aoi], cfg.users.place_jitter_m)
        r, theta = jitter * np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, n)
        lat, lon = offset_points(base_lat, base_lon, r * np.cos(theta), r * np.sin(theta))
        gh12 = geohash.encode(lat, lon, 12)

        # when: an hour of the slot (night runs past midnight), then minutes and seconds
        hours = np.array(contract.MEAL_SLOT_HOURS[slot])
        hour = rng.choice(hours, n)
        offset_h = np.where(hour < 5, hour + 24, hour)
        ts = midnight_ms + ((offset_h * 3600 + rng.integers(0, 3300, n)) * 1000).astype(np.int64)

        # the nearby shops and every term of the utilities, (sessions, local shops)
        local = w.aoi_local_shops[aoi]
        is_open = w.shop_open[local, slot] & opened
        closed = ~is_open.any(axis=1)
        is_open[closed] = opened[closed]  # nothing open in this meal slot: every opened shop takes orders
        cat = w.shop_category[local]
        n_cat = w.slot_profile.shape[1]
        taste = np.log(w.user_taste[gu[:, None], slot, cat] * n_cat)
        price_fit = -w.user_price_sensitivity[gu, None] * np.abs(np.log(w.shop_price[local] / w.user_price[gu, None]))
        dist_km = geohash.haversine_m(lat[:, None], lon[:, None], w.shop_lat[local], w.shop_lon[local]) / 1000.0
        known_place = ~wander
        pk = np.where(known_place, place, 0)
        habit_shop = np.log1p(self.habit_shop[su, pk, slot]) * known_place[:, None]
        habit_cat = np.log1p(np.take_along_axis(self.habit_cat[su, pk, slot], cat, axis=1)) * known_place[:, None]
        recent = np.log1p(np.take_along_axis(self.recent[su], cat, axis=1))
        quality = w.shop_quality[local]
        appeal = w.shop_appeal[local]
        loyalty = w.user_loyalty[gu, None]

        events = _Events()
        chosen = np.full(n, -1)
        # ---- the ad request at the start of a session
        req = np.flatnonzero(rng.uniform(size=n) < ads.request_prob)
        if req.size:
            click_logit = (cm.bias + cm.taste * taste + cm.price * price_fit - cm.distance_per_km * dist_km
                           + cm.habit_shop * loyalty * habit_shop + cm.habit_category * habit_cat
                           + cm.recent * recent + cm.quality * quality + cm.appeal * appeal)
            clicked = self._auction(req, su, gu, slot, ts, gh12, aoi, local, is_open, dist_km, click_logit)
            if clicked[0].size:
                cs, cl, cp = clicked
                events.add(cs, cl, Action.CLICK, 2 + 5 * cp.astype(np.int64))
                # an ad click often becomes the session's choice (first clicked ad wins)
                first = np.unique(cs, return_index=True)[1]
                convert = rng.uniform(size=first.size) < b.ad_conversion_prob
                chosen[cs[first[convert]]] = cl[first[convert]]

        # ---- the organic part: pick a shop, browse it, maybe look at another, maybe order
        utility = (b.choice_taste * taste + b.choice_price * price_fit - b.choice_distance_per_km * dist_km
                   + b.choice_habit * loyalty * habit_shop + b.choice_recent * recent + b.choice_quality * quality
                   + b.choice_appeal * appeal)
        utility = np.where(is_open, utility, -np.inf)
        chosen = np.where(chosen >= 0, chosen, _gumbel_argmax(rng, utility))
        rows = np.arange(n)
        n_clicks = 1 + rng.poisson(b.clicks_per_session, n)
        cs = np.repeat(rows, n_clicks)
        events.add(cs, chosen[cs], Action.CLICK, 30 + 40 * (np.arange(cs.size) - np.repeat(np.cumsum(n_clicks) - n_clicks, n_clicks)))
        explore = np.flatnonzero(rng.uniform(size=n) < b.explore_prob)
        if explore.size:
            u2 = utility[explore].copy()
            u2[np.arange(explore.size), chosen[explore]] = -np.inf
            ok = np.isfinite(u2).any(axis=1)
            explore, u2 = explore[ok], u2[ok]
            events.add(explore, _gumbel_argmax(rng, u2), Action.CLICK, np.full(explore.size, 400))
        order = np.flatnonzero(rng.uniform(size=n) < b.order_prob)
        events.add(order, chosen[order], Action.ORDER, np.full(order.size, 600))

        e_sess, e_local, e_action, e_delay = events.arrays()
        self._update_state(su, pk, known_place, slot, cat, e_sess, e_local, e_action)
        self._emit_behaviours(gu, ts, gh12, aoi, local, e_sess, e_local, e_action, e_delay)

    # ------------------------------------------------------------------ ads
    def _auction(self, req, su, gu, slot, ts, gh12, aoi, local, is_open, dist_km, click_logit):
        """Logging policy over nearby ads; writes impressions; returns clicked (session, local shop, position)."""
        w, ads, rng = self.w, self.cfg.ads, self.rng
        m = local.shape[1]
        # candidate set: up to `candidates` random open nearby shops, each with its ad (first item)
        keys = np.where(is_open[req], rng.uniform(size=(req.size, m)), np.inf)
        n_cand = min(ads.candidates, m)
        cand = np.argsort(keys, axis=1)[:, :n_cand]
        valid = np.isfinite(np.take_along_axis(keys, cand, axis=1))
        n_valid = valid.sum(axis=1)
        shop = np.take_along_axis(local[req], cand, axis=1)
        item = w.shop_item_start[shop]
        bid = w.item_bid[item].astype(np.float64)
        # the logging policy: a non-personal score (bid x shop quality x meal-slot popularity) ranked
        # greedily, except with probability epsilon a uniformly random ranking.
        n_cat = w.slot_profile.shape[1]
        log_score = np.log(bid) + w.shop_quality[shop] + 0.5 * np.log(w.slot_profile[slot, w.shop_category[shop]] * n_cat)
        greedy_key = np.where(valid, -log_score, np.inf)
        greedy_pos = np.argsort(np.argsort(greedy_key, axis=1), axis=1)
        explore = rng.uniform(size=req.size) < ads.logging_epsilon
        random_key = np.where(valid, rng.uniform(size=greedy_key.shape), np.inf)
        pos = np.where(explore[:, None], np.argsort(np.argsort(random_key, axis=1), axis=1), greedy_pos)
        shown = valid & (pos < ads.slots)
        r_idx, c_idx = np.nonzero(shown)
        position = pos[r_idx, c_idx]
        propensity = ((1 - ads.logging_epsilon) * (greedy_pos[r_idx, c_idx] == position)
                      + ads.logging_epsilon / n_valid[r_idx])
        examination = np.asarray(ads.examination)[np.minimum(position, len(ads.examination) - 1)]
        p_click = examination * _sigmoid(click_logit[req][r_idx, cand[r_idx, c_idx]])
        label = rng.uniform(size=p_click.size) < p_click

        sess = req[r_idx]
        request_ids = self._ids("request", req.size)
        s_shop = shop[r_idx, c_idx]
        s_item = item[r_idx, c_idx]
        ctx = contract.local_time_fields(ts[sess], self.cfg.city.utc_offset_hours)
        gh12_s = gh12[sess]
        table = contract.to_table(contract.IMPRESSIONS, {
            "impression_id": self._ids("impression", sess.size), "request_id": request_ids[r_idx],
            "user_id": gu[sess] + 1, "ts": ts[sess],
            "geohash_12": gh12_s, "geohash_6": gh12_s.astype("U6"), "aoi_id": aoi[sess] + 1,
            "city_id": np.full(sess.size, self.cfg.city.city_id), **ctx,
            "item_id": s_item + 1, "shop_id": s_shop + 1, "category_1_id": w.shop_category[s_shop] + 1,
            "brand_id": w.shop_brand[s_shop] + 1, "price": w.item_price[s_item],
            "distance_m": dist_km[sess, cand[r_idx, c_idx]] * 1000.0, "bid": w.item_bid[s_item],
            "position": position, "propensity": propensity, "label": label.astype(np.int8),
            "oracle_click_prob": p_click,
        })
        self.pending["impressions"].append(table)
        self._log_candidates(req, cand, valid, n_valid, shop, item, bid, log_score, greedy_pos, pos, explore,
                             click_logit, dist_km, gu, ts, request_ids, r_idx, c_idx, table["impression_id"], label)
        self.stats.requests += req.size
        self.stats.clicks += int(label.sum())
        hit = np.flatnonzero(label)
        order = np.lexsort((position[hit], sess[hit]))
        hit = hit[order]
        return sess[hit], cand[r_idx[hit], c_idx[hit]], position[hit]

    # ------------------------------------------------------------------ state and output
    def _update_state(self, su, pk, known_place, slot, cat, e_sess, e_local, e_action) -> None:
        b = self.cfg.behaviour
        weight = np.where(e_action == Action.ORDER, b.order_weight, b.click_weight).astype(np.float32)
        e_cat = cat[e_sess, e_local]
        e_user = su[e_sess]
        np.add.at(self.recent, (e_user, e_cat), weight)
        keep = known_place[e_sess]
        e_user, e_place, e_cat, e_local, weight = e_user[keep], pk[e_sess][keep], e_cat[keep], e_local[keep], weight[keep]
        np.add.at(self.habit_shop, (e_user, e_place, slot, e_local), weight)
        np.add.at(self.habit_cat, (e_user, e_place, slot, e_cat), weight)

    def _log_candidates(self, req, cand, valid, n_valid, shop, item, bid, log_score, greedy_pos, pos, explore,
                        click_logit, dist_km, gu, ts, request_ids, r_idx, c_idx, impression_ids, label) -> None:
        """The ad_candidates log: every valid candidate of every request, with the logging policy's slot
        probabilities P(shown at slot k) = (1 - eps) [greedy slot == k] + eps / n_valid (a uniformly random
        ranking puts any candidate at any slot with probability 1 / n_valid), and, simulator only, the true
        click probability at each slot. Deterministic given the auction (no random draws)."""
        w, ads = self.w, self.cfg.ads
        eps, slots = ads.logging_epsilon, ads.slots
        cr, cc = np.nonzero(valid)  # request row, candidate column
        k = np.arange(slots)
        propensities = ((1 - eps) * (greedy_pos[cr, cc][:, None] == k[None, :])
                        + eps / n_valid[cr][:, None]).astype(np.float32)
        examination = np.asarray(ads.examination)[np.minimum(k, len(ads.examination) - 1)]
        relevance = _sigmoid(click_logit[req][cr, cand[cr, cc]])
        slot_clicks = (examination[None, :] * relevance[:, None]).astype(np.float32)
        shown_at = np.full(valid.shape, -1, dtype=np.int64)  # impression row of (request, candidate), -1 if none
        shown_at[r_idx, c_idx] = np.arange(r_idx.size)
        row = shown_at[cr, cc]
        shown = row >= 0
        sess = req[cr]
        s_shop, s_item = shop[cr, cc], item[cr, cc]
        n = cr.size
        table = contract.to_table(contract.AD_CANDIDATES, {
            "candidate_id": self._ids("candidate", n), "request_id": request_ids[cr], "user_id": gu[sess] + 1,
            "ts": ts[sess], "item_id": s_item + 1, "shop_id": s_shop + 1,
            "category_1_id": w.shop_category[s_shop] + 1, "brand_id": w.shop_brand[s_shop] + 1,
            "price": w.item_price[s_item], "distance_m": dist_km[sess, cand[cr, cc]] * 1000.0, "bid": bid[cr, cc],
            "logging_score": np.exp(log_score[cr, cc]), "explored": explore[cr].astype(np.int8),
            "slot_propensities": pa.FixedSizeListArray.from_arrays(propensities.ravel(), slots).cast(
                pa.list_(pa.float32())),
            "position": pa.array(np.where(shown, pos[cr, cc], 0), mask=~shown, type=pa.int16()),
            "impression_id": pa.array(np.asarray(impression_ids)[np.maximum(row, 0)], mask=~shown, type=pa.int64()),
            "label": pa.array(label[np.maximum(row, 0)].astype(np.int8), mask=~shown, type=pa.int8()),
            "oracle_slot_click_probs": pa.FixedSizeListArray.from_arrays(slot_clicks.ravel(), slots).cast(
                pa.list_(pa.float32())),
        })
        self.pending["ad_candidates"].append(table)

    def _emit_behaviours(self, gu, ts, gh12, aoi, local, e_sess, e_local, e_action, e_delay) -> None:
        w, rng = self.w, self.rng
        shop = local[e_sess, e_local]
        item = w.shop_item_start[shop] + (rng.uniform(size=shop.size) * w.shop_item_count[shop]).astype(np.int64)
        e_ts = ts[e_sess] + e_delay.astype(np.int64) * 1000
        order = np.argsort(e_ts, kind="stable")
        shop, item, e_sess, e_ts, e_action = shop[order], item[order], e_sess[order], e_ts[order], e_action[order]
        table = contract.to_table(contract.BEHAVIOURS, {
            "event_id": self._ids("event", shop.size), "user_id": gu[e_sess] + 1, "ts": e_ts, "action": e_action,
            "shop_id": shop + 1, "item_id": item + 1, "category_1_id": w.shop_category[shop] + 1,
            "brand_id": w.shop_brand[shop] + 1, "price": w.item_price[item], "shop_aoi_id": w.shop_aoi[shop] + 1,
            "shop_geohash_6": pc.take(w.shop_geohash_6, pa.array(shop)),
            "geohash_6": gh12[e_sess].astype("U6"), "aoi_id": aoi[e_sess] + 1,
            **contract.local_time_fields(e_ts, self.cfg.city.utc_offset_hours),
            "city_id": np.full(shop.size, self.cfg.city.city_id),
        })
        self.pending["behaviours"].append(table)

    def _flush(self, before_ms: int | None) -> None:
        """Write every pending row earlier than `before_ms` (all when None), one file per local date."""
        offset_ms = int(self.cfg.city.utc_offset_hours * 3600 * 1000)
        for name, parts in self.pending.items():
            if not parts:
                continue
            table = pa.concat_tables(parts)
            if before_ms is None:
                ready, rest = table, table.slice(0, 0)
            else:
                early = pc.less(table["ts"], before_ms)
                ready, rest = table.filter(early), table.filter(pc.invert(early))
            self.pending[name] = [rest] if rest.num_rows else []
            if ready.num_rows == 0:
                continue
            ready = ready.sort_by([("ts", "ascending")])
            day = (ready["ts"].to_numpy() + offset_ms) // 86_400_000
            for d in np.unique(day):
                date = dt.date(1970, 1, 1) + dt.timedelta(days=int(d))
                part = ready.filter(pa.array(day == d))
                path = self.out / name / f"date={date.isoformat()}" / f"part-{self.chunk:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(part, path)
                setattr(self.stats, name, getattr(self.stats, name) + part.num_rows)
