"""Synthetic shop data that follows the input contract and behaves like a real shop.

The generative story (every step is vectorised with NumPy, so 1M events take seconds):

1. **Catalogue.** Ten categories, each with its own nouns, attribute words, feature phrases,
   brands, audience words and a log-normal price around a category-typical median. An item is
   ``brand + audience + attribute + noun + feature`` ("Trailblaze men's waterproof trail running
   shoes, breathable mesh"). Brands carry a price premium; items carry a latent quality that
   drives their popularity (a heavy-tailed log-normal).
2. **Users.** Age, gender, region, occupation (tied to age), membership (tied to activity) and a
   signup time. Each user's category interest is a softmax over
   ``gender effect + age-band effect + region effect + personal noise``, and it **drifts**
   linearly over the window towards a personal direction, so recent behaviour matters more than old.
   Price sensitivity falls with age and membership tier.
3. **Sessions.** Poisson many per user (activity is log-normal). Device depends on age; the hour
   of day follows a device-specific daily curve (desktop at work hours, app in the evening);
   weekends shift towards leisure categories. The session's intent category is drawn from the
   user's interest at that moment **plus a context effect** (hour bucket and device), and within it
   an intent noun and, often, an intent attribute.
4. **Search.** About a third of sessions (most sessions that arrive from the ``search`` channel)
   start with a query that states the intent in varied wording: synonyms of the noun, with or
   without the attribute, the audience, a brand or a price phrase.
5. **Funnel.** Each session views a handful of items: most from the intent category (and, more so
   after a search, the intent noun), the rest from the global popularity distribution. Most views
   start from an impression (the item shown in a list, seconds before), and the session shows a few
   more items that nobody opens, less on target than the opened ones. A view becomes a click, a
   click an add-to-cart, a cart a purchase, with logistic probabilities that rise with text match
   (noun and attribute), interest and quality, and fall with price for price-sensitive users. A
   view is sometimes saved as a favourite (more so when it matches and was not bought), and some
   favourites and abandoned carts are bought on a later visit: the item viewed again, carted and
   paid. So people buy what they viewed. Some purchases are reviewed days later; the rating follows
   the match and the quality, and the review text follows the rating.

So query text, titles, personal features and context each carry signal that a model can learn
and that popularity alone cannot. The output is deterministic for a seed: the window ends at a
fixed date, never "today".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_END = pd.Timestamp("2026-06-30T00:00:00Z")


@dataclass(frozen=True)
class Category:
    path: str
    nouns: tuple[tuple[str, ...], ...]  # each noun with its query synonyms, canonical first
    attributes: tuple[str, ...]
    features: tuple[str, ...]
    brands: tuple[str, ...]
    audiences: tuple[str, ...]
    median_price: float
    leisure: float  # > 0: more likely in the evening and at weekends
    desktop: float  # > 0: more likely on desktop


CATEGORIES: tuple[Category, ...] = (
    Category(
        "Sports>Shoes>Running",
        (("trail running shoes", "trail runners", "off-road running shoes"),
         ("road running shoes", "running sneakers", "jogging shoes"),
         ("racing flats", "marathon shoes", "race day shoes")),
        ("waterproof", "lightweight", "cushioned", "wide-fit", "carbon-plated"),
        ("breathable mesh", "reflective details", "grippy outsole", "recycled upper"),
        ("Trailblaze", "Stridewell", "Apexrun", "Kinetica"),
        ("men's", "women's", "unisex"), 95.0, 0.2, -0.2,
    ),
    Category(
        "Electronics>Audio>Headphones",
        (("wireless earbuds", "bluetooth earphones", "true wireless buds"),
         ("over-ear headphones", "studio headphones", "closed-back headphones"),
         ("noise cancelling headphones", "anc headphones", "quiet headphones")),
        ("noise-cancelling", "waterproof", "long-battery", "low-latency", "foldable"),
        ("with charging case", "hi-res audio", "multipoint pairing", "built-in mic"),
        ("Sonique", "Auralis", "Beatform", "Echolab"),
        ("", "kids'", "pro"), 120.0, 0.3, 0.6,
    ),
    Category(
        "Electronics>Computers>Laptops",
        (("gaming laptop", "gaming notebook", "laptop for gaming"),
         ("ultrabook", "thin and light laptop", "slim laptop"),
         ("2-in-1 laptop", "convertible laptop", "touchscreen laptop")),
        ("16GB", "OLED", "lightweight", "14-inch", "long-battery"),
        ("with backlit keyboard", "fast charging", "Wi-Fi 7", "fingerprint reader"),
        ("Voltbook", "Northstar", "Lumina", "Corelane"),
        ("", "student", "business"), 1100.0, 0.0, 1.2,
    ),
    Category(
        "Home>Kitchen>Coffee",
        (("espresso machine", "espresso maker", "coffee machine"),
         ("coffee grinder", "burr grinder", "bean grinder"),
         ("pour-over kettle", "gooseneck kettle", "drip kettle")),
        ("stainless", "compact", "programmable", "electric", "manual"),
        ("with milk frother", "temperature control", "easy to clean", "barista grade"),
        ("Brewhaus", "Crema&Co", "Morning Ritual", "Kettleworks"),
        ("", "home", "barista"), 140.0, -0.6, 0.1,
    ),
    Category(
        "Beauty>Skincare",
        (("face moisturizer", "moisturising cream", "hydrating cream"),
         ("vitamin c serum", "brightening serum", "face serum"),
         ("sunscreen spf 50", "sun cream", "spf face lotion")),
        ("fragrance-free", "vegan", "oil-free", "sensitive-skin", "organic"),
        ("for dry skin", "with hyaluronic acid", "dermatologist tested", "travel size"),
        ("Glowlab", "Purely", "Dermaveil", "Bloomskin"),
        ("women's", "men's", ""), 28.0, 0.3, -0.5,
    ),
    Category(
        "Fashion>Women>Dresses",
        (("summer dress", "sundress", "light dress"),
         ("evening dress", "cocktail dress", "party dress"),
         ("maxi dress", "long dress", "floor-length dress")),
        ("floral", "linen", "silk", "wrap", "sleeveless"),
        ("with pockets", "machine washable", "relaxed fit", "tie waist"),
        ("Maison Ivy", "Petalwear", "Lune", "Atelier Rosa"),
        ("women's", "petite", "plus-size"), 65.0, 0.5, -0.7,
    ),
    Category(
        "Fashion>Men>Jackets",
        (("rain jacket", "waterproof jacket", "shell jacket"),
         ("down jacket", "puffer jacket", "winter coat"),
         ("denim jacket", "jean jacket", "trucker jacket")),
        ("waterproof", "packable", "insulated", "slim-fit", "hooded"),
        ("with taped seams", "recycled fabric", "zip pockets", "windproof"),
        ("Northpeak", "Urban Ridge", "Coldline", "Harbor & Co"),
        ("men's", "unisex", "big and tall"), 150.0, 0.1, -0.3,
    ),
    Category(
        "Toys>Building",
        (("building blocks set", "brick set", "construction toy"),
         ("robot kit", "stem robot", "coding robot"),
         ("marble run", "marble track", "ball run")),
        ("magnetic", "educational", "500-piece", "wooden", "glow-in-the-dark"),
        ("for ages 6+", "with storage box", "compatible bricks", "gift ready"),
        ("Brickly", "Tinkertown", "Playforge", "Clever Cubs"),
        ("kids'", "family", "toddler"), 45.0, 0.8, -0.2,
    ),
    Category(
        "Books>Fiction",
        (("mystery novel", "crime thriller", "detective novel"),
         ("fantasy novel", "epic fantasy book", "fantasy saga"),
         ("romance novel", "love story book", "romantic fiction")),
        ("bestselling", "hardcover", "paperback", "award-winning", "illustrated"),
        ("first edition", "with bonus chapter", "book club pick", "signed copy"),
        ("Inkwell Press", "Harbor Books", "Quillhouse", "Moonlit Pages"),
        ("", "young adult", "adult"), 16.0, 0.6, 0.0,
    ),
    Category(
        "Outdoor>Camping",
        (("camping tent", "backpacking tent", "dome tent"),
         ("sleeping bag", "mummy bag", "camping sleeping bag"),
         ("camping stove", "backpacking stove", "gas stove")),
        ("ultralight", "waterproof", "4-season", "compact", "insulated"),
        ("with carry bag", "quick setup", "windproof design", "for 2 people"),
        ("Trailblaze", "Wildcamp", "Summitline", "Pinecrest"),
        ("", "family", "expedition"), 130.0, 0.4, 0.2,
    ),
)

REGIONS = ("Shanghai", "Beijing", "Guangdong>Shenzhen", "Guangdong>Guangzhou", "Zhejiang>Hangzhou",
           "Sichuan>Chengdu", "Hubei>Wuhan", "Jiangsu>Nanjing", "Shaanxi>Xi'an", "Chongqing")
DEVICES = ("mobile", "app", "desktop", "tablet")
CHANNELS = ("organic", "search", "recommendation", "social", "email", "ads")
CHANNEL_P = np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.10])
MEMBERSHIP = ("none", "silver", "gold", "platinum")
PRICE_PHRASES = ("cheap", "affordable", "best", "premium", "top rated", "deal on")
REVIEW_TEXT = {
    1: ("Very disappointed, the {noun} broke quickly.", "Not as described. Would not buy again."),
    2: ("The {noun} is below expectations.", "Mediocre quality for the price."),
    3: ("An okay {noun}, nothing special.", "Does the job, average quality."),
    4: ("Good {noun}, happy with it.", "Nice quality, arrived fast."),
    5: ("Excellent {noun}! Exactly what I wanted.", "Love it, great value, highly recommend."),
}


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _pick(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a probability matrix."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def make_items(rng: np.random.Generator, n_items: int) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n_cat = len(CATEGORIES)
    cat = rng.choice(n_cat, size=n_items, p=_softmax(rng.normal(0, 0.3, n_cat)))
    noun = rng.integers(0, 3, n_items)
    attr = rng.integers(0, 5, n_items)
    brand = rng.integers(0, 4, n_items)
    quality = rng.normal(0, 1, n_items)
    premium = np.array([0.85, 1.0, 1.15, 1.35])[brand]
    medians = np.array([c.median_price for c in CATEGORIES])[cat]
    price = np.round(medians * premium * np.exp(rng.normal(0, 0.35, n_items) + 0.1 * quality), 2)
    titles, brands, categories, descriptions = [], [], [], []
    for i in range(n_items):
        c = CATEGORIES[cat[i]]
        audience = c.audiences[rng.integers(0, len(c.audiences))]
        feature = c.features[rng.integers(0, len(c.features))]
        words = [c.brands[brand[i]], audience, c.attributes[attr[i]], c.nouns[noun[i]][0]]
        titles.append(" ".join(w for w in words if w) + f", {feature}")
        brands.append(c.brands[brand[i]])
        categories.append(c.path)
        descriptions.append(f"{c.attributes[attr[i]].capitalize()} {c.nouns[noun[i]][0]} by "
                            f"{c.brands[brand[i]]}: {feature}.")
    items = pd.DataFrame({
        "item_id": [f"i{i:06d}" for i in range(n_items)],
        "title": titles, "category": categories, "brand": brands,
        "description": descriptions, "price": price,
    })
    latent = {"cat": cat, "noun": noun, "attr": attr, "quality": quality, "price": price}
    return items, latent


def make_users(rng: np.random.Generator, n_users: int, start: pd.Timestamp,
               end: pd.Timestamp) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n_cat = len(CATEGORIES)
    age = np.clip(np.round(rng.gamma(6.0, 6.0, n_users) + 14), 16, 85).astype(int)
    gender = rng.choice(3, size=n_users, p=[0.52, 0.46, 0.02])
    region = rng.choice(len(REGIONS), size=n_users, p=_softmax(rng.normal(0, 0.5, len(REGIONS))))
    age_band = np.digitize(age, [25, 35, 50, 65])
    activity = rng.lognormal(0, 0.8, n_users)
    tier = np.clip(np.digitize(activity + rng.normal(0, 0.4, n_users), [1.0, 2.0, 3.2]), 0, 3)
    occupation = np.where(age < 23, "student",
                 np.where(age >= 63, "retired",
                 np.array(["engineer", "teacher", "designer", "nurse", "sales", "manager",
                           "self-employed"])[rng.integers(0, 7, n_users)]))
    # Demographic effects on interest: fixed tables (not per seed) so the story stays readable.
    g_eff = np.array([
        #  run   head  lapt  coff  skin  dres  jack  toys  book  camp
        [0.2, 0.0, -0.3, 0.3, 1.3, 1.6, -1.0, 0.3, 0.5, -0.3],   # women
        [0.4, 0.5, 0.8, 0.1, -0.8, -2.0, 1.2, 0.1, -0.1, 0.6],   # men
        [0.2, 0.4, 0.3, 0.2, 0.2, 0.0, 0.0, 0.0, 0.4, 0.2],      # other / unstated
    ])
    a_eff = np.array([
        [0.6, 1.0, 0.7, -0.6, 0.4, 0.5, 0.1, -0.8, 0.3, 0.0],    # < 25
        [0.7, 0.4, 0.3, 0.3, 0.3, 0.4, 0.2, 0.8, 0.0, 0.3],      # 25-34: young parents
        [0.3, 0.0, 0.1, 0.6, 0.0, 0.0, 0.3, 0.6, 0.1, 0.5],      # 35-49
        [-0.3, -0.4, -0.3, 0.8, 0.1, -0.2, 0.3, 0.0, 0.7, 0.4],  # 50-64
        [-0.8, -0.7, -0.6, 0.7, 0.0, -0.3, 0.2, 0.3, 1.1, -0.3], # 65+
    ])
    r_eff = np.random.default_rng(7).normal(0, 0.3, (len(REGIONS), n_cat))
    base = g_eff[gender] + a_eff[age_band] + r_eff[region] + rng.normal(0, 0.8, (n_users, n_cat))
    drift = rng.normal(0, 1.0, (n_users, n_cat))
    price_sens = np.clip(1.4 - 0.015 * (age - 18) - 0.25 * tier + rng.normal(0, 0.3, n_users), 0.1, 2.0)
    window = (end - start).total_seconds()
    signup_offset = rng.uniform(-3 * 365 * 86400, window * 0.9, n_users)
    signup_offset = np.where(rng.random(n_users) < 0.75, -np.abs(signup_offset), signup_offset)
    signup = start + pd.to_timedelta(np.round(signup_offset), unit="s")
    users = pd.DataFrame({
        "user_id": [f"u{i:06d}" for i in range(n_users)],
        "age": age,
        "gender": np.array(["female", "male", "other"])[gender],
        "region": np.array(REGIONS)[region],
        "occupation": occupation,
        "membership": np.array(MEMBERSHIP)[tier],
        "signup_timestamp": signup,
    })
    latent = {"base": base, "drift": drift, "price_sens": price_sens, "activity": activity,
              "age": age, "signup_offset": np.maximum(signup_offset, 0.0), "tier": tier}
    return users, latent


def _query_texts(rng: np.random.Generator, cat: np.ndarray, noun: np.ndarray, attr: np.ndarray,
                 has_attr: np.ndarray) -> list[str]:
    out = []
    style = rng.integers(0, 6, len(cat))
    pick = rng.integers(0, 1_000_000, len(cat))
    for c_i, n_i, a_i, h, s, p in zip(cat, noun, attr, has_attr, style, pick, strict=True):
        c = CATEGORIES[c_i]
        synonyms = c.nouns[n_i]
        noun_text = synonyms[p % len(synonyms)]
        attr_text = c.attributes[a_i] if h else ""
        if s == 0:
            q = f"{attr_text} {noun_text}"
        elif s == 1:
            q = f"{PRICE_PHRASES[p % len(PRICE_PHRASES)]} {attr_text} {noun_text}"
        elif s == 2:
            audience = c.audiences[p % len(c.audiences)]
            q = f"{attr_text} {noun_text} for {audience.removesuffix(chr(39) + 's') or 'everyone'}"
        elif s == 3:
            q = f"{c.brands[p % len(c.brands)]} {noun_text} {attr_text}"
        elif s == 4:
            q = f"{noun_text} {attr_text} under {int(c.median_price * (1 + p % 3 * 0.5))}"
        else:
            q = f"{noun_text} {attr_text}".upper() if p % 7 == 0 else f"{noun_text}, {attr_text}"
        out.append(" ".join(q.replace(" ,", ",").split()).strip(", "))
    return out


def _draw_items(rng: np.random.Generator, it: dict[str, np.ndarray], pool: np.ndarray, noun_key: np.ndarray,
                cat_key: np.ndarray) -> np.ndarray:
    """One item per row, by popularity, from its pool: 0 = the session's intent noun in its intent
    category, 1 = the intent category, 2 = the whole catalogue (``noun_key``: category * 3 + noun)."""
    n_cat, n_items = len(CATEGORIES), len(it["cat"])
    pop = np.exp(0.8 * it["quality"])
    key_noun = it["cat"] * 3 + it["noun"]
    out = np.empty(len(pool), dtype=np.int64)
    for p_id, keys, n_groups, v_key in (
        (0, key_noun, n_cat * 3, noun_key),
        (1, it["cat"], n_cat, cat_key),
        (2, np.zeros(n_items, dtype=np.int64), 1, np.zeros(len(pool), dtype=np.int64)),
    ):
        sel = pool == p_id
        order = np.argsort(keys, kind="stable")
        cum = np.cumsum(pop[order])
        counts = np.bincount(keys, minlength=n_groups)
        hi = np.cumsum(counts)
        lo = hi - counts
        lo_w = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
        hi_w = cum[np.maximum(hi - 1, 0)]
        g = v_key[sel]
        empty = counts[g] == 0  # a group with no items falls back to the whole catalogue
        draw = lo_w[g] + rng.random(sel.sum()) * (hi_w[g] - lo_w[g])
        idx = np.searchsorted(cum, draw, side="right").clip(0, n_items - 1)
        chosen = order[idx]
        chosen[empty] = rng.integers(0, n_items, empty.sum())
        out[sel] = chosen
    return out


def generate(n_users: int = 1000, n_items: int = 500, days: int = 30, seed: int = 0,
             end: pd.Timestamp = DEFAULT_END) -> dict[str, pd.DataFrame]:
    """Return the ``users``, ``items`` and ``events`` tables of a synthetic shop."""
    rng = np.random.default_rng(seed)
    end = pd.Timestamp(end).tz_convert("UTC") if pd.Timestamp(end).tzinfo else pd.Timestamp(end, tz="UTC")
    start = end - pd.Timedelta(days=days)
    window = float(days * 86400)
    items, it = make_items(rng, n_items)
    users, us = make_users(rng, n_users, start, end)
    n_cat = len(CATEGORIES)

    # --- sessions -------------------------------------------------------------------------
    n_sess_u = rng.poisson(us["activity"] * 0.12 * days * (1 - us["signup_offset"] / window))
    s_user = np.repeat(np.arange(n_users), n_sess_u)
    n_s = len(s_user)
    day_start = np.floor(rng.uniform(us["signup_offset"][s_user] / 86400, days))
    age = us["age"][s_user]
    dev_logits = np.stack([np.full(n_s, 0.6), 1.0 - 0.03 * (age - 30), 0.02 * (age - 30),
                           np.full(n_s, -1.2)], axis=1)
    s_dev = _pick(rng, _softmax(dev_logits))
    hour_peak = np.array([20.0, 21.0, 11.0, 19.0])[s_dev]
    s_hour = np.mod(np.round(rng.normal(hour_peak, 3.5)), 24).astype(int)
    s_t = day_start * 86400 + s_hour * 3600 + rng.uniform(0, 3600, n_s)
    s_t = np.minimum(s_t, window - 3600)
    s_channel = rng.choice(len(CHANNELS), size=n_s, p=CHANNEL_P)
    weekday = ((start + pd.to_timedelta(s_t, unit="s")).dayofweek.to_numpy())
    leisure_time = ((s_hour >= 18) | (weekday >= 5)).astype(float) - 0.4
    morning = ((s_hour >= 6) & (s_hour < 10)).astype(float)
    leisure = np.array([c.leisure for c in CATEGORIES])
    desktop = np.array([c.desktop for c in CATEGORIES])
    coffee = np.array([1.0 if "Coffee" in c.path else 0.0 for c in CATEGORIES])
    interest = us["base"][s_user] + (s_t / window)[:, None] * us["drift"][s_user]
    context = (leisure_time[:, None] * leisure[None, :] + (s_dev == 2)[:, None] * desktop[None, :]
               + 1.5 * morning[:, None] * coffee[None, :])
    s_cat = _pick(rng, _softmax(interest + context))
    s_noun = rng.integers(0, 3, n_s)
    s_attr = rng.integers(0, 5, n_s)
    s_has_attr = rng.random(n_s) < 0.6
    s_search = rng.random(n_s) < np.where(s_channel == 1, 0.85, 0.3)

    # --- views ----------------------------------------------------------------------------
    n_views = 1 + rng.poisson(4.0, n_s)
    v_sess = np.repeat(np.arange(n_s), n_views)
    n_v = len(v_sess)
    # Pools: 0 = intent noun in intent category, 1 = intent category, 2 = whole catalogue.
    p_noun = np.where(s_search[v_sess], 0.65, 0.35)
    u = rng.random(n_v)
    pool = np.where(u < p_noun, 0, np.where(u < p_noun + 0.35, 1, 2))
    key_noun = it["cat"] * 3 + it["noun"]
    v_item = _draw_items(rng, it, pool, s_cat[v_sess] * 3 + s_noun[v_sess], s_cat[v_sess])

    noun_match = (key_noun[v_item] == s_cat[v_sess] * 3 + s_noun[v_sess]).astype(float)
    attr_match = ((it["attr"][v_item] == s_attr[v_sess]) & s_has_attr[v_sess]
                  & (it["cat"][v_item] == s_cat[v_sess])).astype(float)
    cat_match = (it["cat"][v_item] == s_cat[v_sess]).astype(float)
    v_user = s_user[v_sess]
    all_interest = us["base"][v_user] + (s_t[v_sess] / window)[:, None] * us["drift"][v_user]
    item_interest = np.log(_softmax(all_interest)[np.arange(n_v), it["cat"][v_item]] * n_cat)
    rel_price = np.log(it["price"][v_item] / np.array([c.median_price for c in CATEGORIES])[it["cat"][v_item]])
    ps = us["price_sens"][v_user]
    searched = s_search[v_sess].astype(float)
    click_logit = (-3.6 + 1.1 * noun_match + 0.9 * attr_match + 0.5 * cat_match + 0.45 * item_interest
                   + 0.5 * searched * noun_match + 0.35 * it["quality"][v_item] - 0.9 * ps * rel_price
                   + 0.15 * (s_dev[v_sess] == 1))
    clicked = rng.random(n_v) < _sigmoid(click_logit)
    carted = clicked & (rng.random(n_v) < _sigmoid(-1.4 + 0.7 * noun_match + 0.6 * attr_match
                                                   + 0.3 * item_interest - 1.0 * ps * rel_price))
    bought = carted & (rng.random(n_v) < _sigmoid(-0.4 + 0.3 * us["tier"][v_user] - 0.8 * ps * rel_price
                                                  + 0.2 * it["quality"][v_item]))
    reviewed = bought & (rng.random(n_v) < 0.3)

    # --- timestamps -----------------------------------------------------------------------
    first_view = s_t + np.where(s_search, rng.uniform(2, 20, n_s), 0.0)
    gaps = rng.exponential(45.0, n_v)
    csum = np.cumsum(gaps)
    sess_offset = np.repeat(csum[np.cumsum(n_views) - n_views] - gaps[np.cumsum(n_views) - n_views], n_views)
    v_t = first_view[v_sess] + (csum - sess_offset) - gaps
    c_t = v_t + rng.exponential(8.0, n_v) + 1.0
    a_t = c_t + rng.exponential(60.0, n_v) + 1.0
    p_t = a_t + rng.exponential(180.0, n_v) + 1.0
    r_t = np.minimum(p_t + rng.uniform(1, 6, n_v) * 86400, window - 1)

    quality_v = it["quality"][v_item]
    rating = np.clip(np.round(3.4 + 0.9 * noun_match + 0.5 * attr_match + 0.6 * quality_v
                              + rng.normal(0, 0.8, n_v)), 1, 5)
    qty = 1 + (rng.random(n_v) < 0.12)

    session_ids = np.array([f"s{i:07d}" for i in range(n_s)], dtype=object)
    device_names = np.array(DEVICES, dtype=object)
    channel_names = np.array(CHANNELS, dtype=object)
    item_ids = items["item_id"].to_numpy(dtype=object)
    user_ids = users["user_id"].to_numpy(dtype=object)

    def block(mask: np.ndarray, etype: str, t: np.ndarray, visit: str = "") -> pd.DataFrame:
        """Events of the views in ``mask`` (``visit``: a suffix of the session id, for a later visit)."""
        sess = v_sess[mask]
        return pd.DataFrame({
            "user_id": user_ids[s_user[sess]], "t": t[mask], "event_type": etype,
            "item_id": item_ids[v_item[mask]], "session_id": session_ids[sess] + visit,
            "device": device_names[s_dev[sess]], "channel": channel_names[s_channel[sess]],
        })

    all_v = np.ones(n_v, dtype=bool)
    frames = [block(all_v, "view", v_t), block(clicked, "click", c_t), block(carted, "add_to_cart", a_t)]
    buy = block(bought, "purchase", p_t)
    buy["value"] = np.round(it["price"][v_item[bought]] * qty[bought], 2)
    rev = block(reviewed, "review", r_t)
    rev["rating"] = rating[reviewed]
    rev_nouns = [CATEGORIES[it["cat"][i]].nouns[it["noun"][i]][0] for i in v_item[reviewed]]
    picks = rng.integers(0, 2, reviewed.sum())
    rev["text"] = [REVIEW_TEXT[int(r)][p].format(noun=n)
                   for r, p, n in zip(rating[reviewed], picks, rev_nouns, strict=True)]
    ss = np.flatnonzero(s_search)
    search = pd.DataFrame({
        "user_id": user_ids[s_user[ss]], "t": s_t[ss], "event_type": "search", "item_id": None,
        "session_id": session_ids[ss], "device": device_names[s_dev[ss]],
        "channel": channel_names[s_channel[ss]],
        "query": _query_texts(rng, s_cat[ss], s_noun[ss], s_attr[ss], s_has_attr[ss]),
    })

    # --- the wider funnel: impressions, favourites, later visits -----------------------------
    # Drawn after every other event, so a seed's sessions, views, clicks and carts stay as they were.
    listed = rng.random(n_v) < 0.85  # most views start from a list the item was shown in
    shown_t = v_t - rng.uniform(1, 30, n_v)
    n_unopened = rng.poisson(1.5, n_s)  # items shown in the session that nobody opened, less on target
    u_sess = np.repeat(np.arange(n_s), n_unopened)
    u_item = _draw_items(rng, it, _pick(rng, np.tile([0.2, 0.35, 0.45], (len(u_sess), 1))),
                         s_cat[u_sess] * 3 + s_noun[u_sess], s_cat[u_sess])
    last_view = v_t[np.cumsum(n_views) - 1]
    u_t = first_view[u_sess] + rng.uniform(0, 1, len(u_sess)) * (last_view - first_view)[u_sess] + 0.5
    unopened = pd.DataFrame({
        "user_id": user_ids[s_user[u_sess]], "t": u_t, "event_type": "impression", "item_id": item_ids[u_item],
        "session_id": session_ids[u_sess], "device": device_names[s_dev[u_sess]],
        "channel": channel_names[s_channel[u_sess]],
    })
    favourite = rng.random(n_v) < _sigmoid(-3.4 + 0.8 * noun_match + 0.5 * attr_match + 0.4 * item_interest
                                           + 0.3 * quality_v - 1.5 * bought)
    f_t = v_t + rng.exponential(20.0, n_v) + 1.0
    # Saved for later: some favourites and abandoned carts are bought on a later visit, viewed again first.
    back = ~bought & ((favourite & (rng.random(n_v) < 0.2)) | (carted & (rng.random(n_v) < 0.15)))
    back_t = v_t + rng.uniform(0.3, 6.0, n_v) * 86400
    back &= back_t < window - 600
    back_cart_t = back_t + rng.exponential(60.0, n_v) + 1.0
    back_buy_t = back_cart_t + rng.exponential(180.0, n_v) + 1.0
    later_buy = block(back, "purchase", back_buy_t, "-later")
    later_buy["value"] = it["price"][v_item[back]]
    frames += [block(listed, "impression", shown_t), unopened, block(favourite, "favorite", f_t),
               block(back, "view", back_t, "-later"), block(back, "add_to_cart", back_cart_t, "-later"), later_buy]
    events = pd.concat(frames + [buy, rev, search], ignore_index=True)
    events = events.sort_values(["t", "user_id"], kind="stable").reset_index(drop=True)
    events["event_timestamp"] = start + pd.to_timedelta(np.round(events.pop("t") * 1e6), unit="us")
    events.insert(0, "event_id", [f"e{i:09d}" for i in range(len(events))])
    events = events[["event_id", "user_id", "event_timestamp", "event_type", "item_id", "query",
                     "text", "rating", "value", "device", "channel", "session_id"]]
    return {"users": users, "items": items, "events": events}


def write(tables: dict[str, pd.DataFrame], out: Path, fmt: str = "csv") -> list[Path]:
    """Write contract files (``users.csv`` …) into ``out``; timestamps as ISO-8601 UTC."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, frame in tables.items():
        path = out / f"{name}.{fmt}"
        for other in out.glob(f"{name}.*"):
            other.unlink()  # a folder holds one file per table, or the loader refuses it
        if fmt == "parquet":
            frame = frame.copy()
            for col in frame.select_dtypes(include=["datetimetz"]).columns:
                frame[col] = frame[col].astype("datetime64[us, UTC]")
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ")
        paths.append(path)
    return paths
