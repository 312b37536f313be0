"""Synthetic shop data that follows the input contract and behaves like a real shop.

The generative story (every step is vectorised with NumPy, so 1M events take seconds):

1. **Catalogue.** About ten categories, each with its own nouns, attribute words, feature phrases,
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

**Locales.** The behaviour above is shared; a :class:`Locale` swaps only the words and the map:
the catalogue, regions, devices, channels, user attributes, how titles, descriptions, queries and
reviews are written, and which demographic groups like which category. ``en`` is an English shop
priced in dollars; ``zh`` a Chinese one in the style of Taobao/Tmall, priced in yuan (``ZH``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
    morning: float = 0.0  # > 0: more likely between 6 and 10 (coffee, tea)
    # More title words, for locales whose titles carry them (the Chinese one): model numbers, sizes or
    # net contents, and the description's labels for the attribute, the size and the audience.
    models: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    labels: tuple[str, str, str] = ("", "", "")


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
        ("", "home", "barista"), 140.0, -0.6, 0.1, morning=1.0,
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
# Demographic effects on interest, one column per category of CATEGORIES: fixed tables (not per
# seed) so the story stays readable.
GENDER_EFFECT = (
    #  run   head  lapt  coff  skin  dres  jack  toys  book  camp
    (0.2, 0.0, -0.3, 0.3, 1.3, 1.6, -1.0, 0.3, 0.5, -0.3),   # women
    (0.4, 0.5, 0.8, 0.1, -0.8, -2.0, 1.2, 0.1, -0.1, 0.6),   # men
    (0.2, 0.4, 0.3, 0.2, 0.2, 0.0, 0.0, 0.0, 0.4, 0.2),      # other / unstated
)
AGE_EFFECT = (
    (0.6, 1.0, 0.7, -0.6, 0.4, 0.5, 0.1, -0.8, 0.3, 0.0),    # < 25
    (0.7, 0.4, 0.3, 0.3, 0.3, 0.4, 0.2, 0.8, 0.0, 0.3),      # 25-34: young parents
    (0.3, 0.0, 0.1, 0.6, 0.0, 0.0, 0.3, 0.6, 0.1, 0.5),      # 35-49
    (-0.3, -0.4, -0.3, 0.8, 0.1, -0.2, 0.3, 0.0, 0.7, 0.4),  # 50-64
    (-0.8, -0.7, -0.6, 0.7, 0.0, -0.3, 0.2, 0.3, 1.1, -0.3), # 65+
)


def _en_item_text(rng: np.random.Generator, c: Category, noun: int, attr: int, brand: int) -> tuple[str, str]:
    """Title and description of an English listing: "Brand audience attribute noun, feature"."""
    audience = c.audiences[rng.integers(0, len(c.audiences))]
    feature = c.features[rng.integers(0, len(c.features))]
    words = [c.brands[brand], audience, c.attributes[attr], c.nouns[noun][0]]
    title = " ".join(w for w in words if w) + f", {feature}"
    return title, f"{c.attributes[attr].capitalize()} {c.nouns[noun][0]} by {c.brands[brand]}: {feature}."


def _en_query(c: Category, noun: int, attr: str, price: str, style: int, pick: int) -> str:
    """An English query in one of six styles; ``pick`` chooses the synonym, audience and brand."""
    synonyms = c.nouns[noun]
    noun_text = synonyms[pick % len(synonyms)]
    if style == 0:
        q = f"{attr} {noun_text}"
    elif style == 1:
        q = f"{price} {attr} {noun_text}"
    elif style == 2:
        audience = c.audiences[pick % len(c.audiences)]
        q = f"{attr} {noun_text} for {audience.removesuffix(chr(39) + 's') or 'everyone'}"
    elif style == 3:
        q = f"{c.brands[pick % len(c.brands)]} {noun_text} {attr}"
    elif style == 4:
        q = f"{noun_text} {attr} under {int(c.median_price * (1 + pick % 3 * 0.5))}"
    else:
        q = f"{noun_text} {attr}".upper() if pick % 7 == 0 else f"{noun_text}, {attr}"
    return " ".join(q.replace(" ,", ",").split()).strip(", ")


# --- the Chinese shop (zh): Taobao/Tmall-style 类目, titles and queries; prices in yuan -----------------
ZH_CATEGORIES: tuple[Category, ...] = (
    Category(
        "运动户外>跑步鞋",
        (("跑步鞋", "跑鞋", "慢跑鞋"), ("越野跑鞋", "越野鞋", "登山跑鞋"), ("竞速跑鞋", "马拉松跑鞋", "碳板跑鞋")),
        ("透气", "轻便", "减震", "防滑", "防水"),
        ("网面", "软底", "回弹", "耐磨"),
        ("Li Ning/李宁", "ANTA/安踏", "Xtep/特步", "361度"),
        ("男款", "女款", "男女同款"), 399.0, 0.2, -0.2,
        models=("2代", "3代", "Pro", "Max"), labels=("功能", "", "款式"),
    ),
    Category(
        "消费电子>耳机",
        (("蓝牙耳机", "无线耳机", "真无线耳机"), ("头戴式耳机", "头戴耳机", "耳罩式耳机"),
         ("降噪耳机", "主动降噪耳机", "ANC耳机")),
        ("降噪", "无线", "长续航", "低延迟", "防水"),
        ("运动", "游戏电竞", "超长待机", "高音质"),
        ("Sansui/山水", "EDIFIER/漫步者", "HUAWEI/华为", "Xiaomi/小米"),
        ("", "学生", "儿童"), 199.0, 0.3, 0.6,
        models=("U3", "X5", "W820", "T10"), labels=("功能", "", "适用人群"),
    ),
    Category(
        "电脑办公>笔记本电脑",
        (("游戏本", "游戏笔记本", "电竞本"), ("轻薄本", "轻薄笔记本", "超极本"),
         ("二合一笔记本", "平板二合一", "翻转本")),
        ("16G内存", "OLED屏", "高刷屏", "独显", "长续航"),
        ("办公商务", "学生网课", "设计剪辑", "电竞游戏"),
        ("Lenovo/联想", "HUAWEI/华为", "ASUS/华硕", "机械革命"),
        ("", "学生", "商务"), 5999.0, 0.0, 1.2,
        models=("Y9000P", "X14", "Pro16", "Air13"), sizes=("512G", "1TB", "2TB"),
        labels=("配置", "硬盘容量", "适用人群"),
    ),
    Category(
        "食品饮料>茶叶",
        (("绿茶", "龙井茶", "毛尖"), ("普洱茶", "普洱", "熟普"), ("红茶", "滇红", "金骏眉")),
        ("特级", "春茶", "古树", "高山", "有机"),
        ("礼盒装", "罐装", "送礼佳品", "口粮茶"),
        ("八马", "大益", "中茶", "艺福堂"),
        ("", "送长辈", "办公室"), 168.0, -0.6, 0.1, morning=1.0,
        sizes=("100g", "250g", "500g"), labels=("等级", "净含量", "适用场景"),
    ),
    Category(
        "美妆洗护>洗发水",
        (("洗发水", "洗发露", "洗头膏"), ("护发素", "润发乳", "护发乳"), ("发膜", "护发膜", "焗油膏")),
        ("去屑", "控油", "蓬松", "柔顺", "无硅油"),
        ("清爽", "持久留香", "修护干枯", "止痒"),
        ("海飞丝", "欧莱雅", "阿道夫", "滋源"),
        ("男士", "女士", ""), 59.0, 0.3, -0.5,
        sizes=("400ml", "500ml", "750ml"), labels=("功效", "净含量", "适用人群"),
    ),
    Category(
        "美妆洗护>护肤品",
        (("洗面奶", "洁面乳", "洁面"), ("面霜", "保湿霜", "乳霜"), ("防晒霜", "防晒乳", "防晒")),
        ("保湿", "控油", "美白", "敏感肌", "补水"),
        ("温和", "清爽不油腻", "深层清洁", "学生党"),
        ("欧莱雅", "百雀羚", "自然堂", "PROYA/珀莱雅"),
        ("男士", "女士", ""), 129.0, 0.3, -0.5,
        sizes=("50g", "100g", "120ml"), labels=("功效", "净含量", "适用人群"),
    ),
    Category(
        "大服饰>连衣裙",
        (("连衣裙", "裙子", "连身裙"), ("吊带裙", "吊带连衣裙", "背心裙"), ("长裙", "长款连衣裙", "过膝长裙")),
        ("碎花", "法式", "纯棉", "真丝", "收腰"),
        ("显瘦", "气质", "夏季", "温柔风"),
        ("ONLY", "太平鸟", "伊芙丽", "乐町"),
        ("", "小个子", "大码"), 259.0, 0.5, -0.7, labels=("元素", "", "适用人群"),
    ),
    Category(
        "大服饰>男士外套",
        (("冲锋衣", "防风外套", "户外夹克"), ("羽绒服", "羽绒外套", "面包服"), ("牛仔外套", "牛仔夹克", "牛仔衣")),
        ("防水", "加厚", "连帽", "修身", "宽松"),
        ("秋冬", "保暖", "三合一", "工装风"),
        ("波司登", "骆驼", "JACK&JONES/杰克琼斯", "海澜之家"),
        ("男士", "", "大码"), 599.0, 0.1, -0.3, labels=("款式", "", "适用人群"),
    ),
    Category(
        "母婴>益智玩具",
        (("积木", "拼装积木", "积木玩具"), ("编程机器人", "智能机器人", "机器人玩具"),
         ("磁力片", "磁力积木", "磁性积木")),
        ("益智", "大颗粒", "早教", "拼装", "木质"),
        ("3-6岁", "生日礼物", "收纳盒装", "男孩女孩"),
        ("LEGO/乐高", "布鲁可", "贝恩施", "Hape"),
        ("儿童", "宝宝", "男孩"), 199.0, 0.8, -0.2,
        sizes=("100粒", "300粒", "500粒"), labels=("特点", "颗粒数", "适用人群"),
    ),
    Category(
        "图书>小说",
        (("悬疑小说", "推理小说", "侦探小说"), ("科幻小说", "科幻书", "科幻"), ("言情小说", "爱情小说", "青春小说")),
        ("正版", "精装", "平装", "获奖", "全套"),
        ("畅销书", "签名版", "赠书签", "典藏版"),
        ("人民文学出版社", "新星出版社", "读客", "上海译文"),
        ("", "青少年", "成人"), 39.0, 0.6, 0.0, labels=("版本", "", "适读人群"),
    ),
    Category(
        "家居家装>窗帘",
        (("落地窗帘", "窗帘", "窗帘布"), ("遮光帘", "全遮光窗帘", "遮光布"), ("纱帘", "窗纱", "白纱帘")),
        ("遮光", "加厚", "隔音", "北欧风", "免打孔"),
        ("卧室", "客厅", "防晒隔热", "简约现代"),
        ("水星家纺", "富安娜", "Dohia/多喜爱", "南极人"),
        ("", "儿童房", "出租屋"), 159.0, 0.2, 0.0,
        sizes=("1.5m宽", "2m宽", "3m宽"), labels=("功能", "尺寸", "适用空间"),
    ),
)
ZH_GENDER_EFFECT = (
    #  跑鞋 耳机  笔记本 茶叶 洗发 护肤 连衣裙 外套 玩具 小说 窗帘
    (0.1, 0.0, -0.3, 0.1, 0.8, 1.3, 1.6, -1.0, 0.3, 0.5, 0.5),    # 女
    (0.5, 0.5, 0.8, 0.3, 0.2, -0.6, -2.0, 1.2, 0.1, -0.1, -0.2),  # 男
    (0.2, 0.4, 0.3, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0, 0.4, 0.1),      # 保密
)
ZH_AGE_EFFECT = (
    (0.6, 1.0, 0.7, -0.8, 0.3, 0.4, 0.5, 0.1, -0.8, 0.4, -0.5),   # < 25
    (0.7, 0.4, 0.3, -0.2, 0.3, 0.3, 0.4, 0.2, 0.8, 0.0, 0.5),     # 25-34: young parents, a first home
    (0.3, 0.0, 0.1, 0.5, 0.2, 0.0, 0.0, 0.3, 0.6, 0.1, 0.6),      # 35-49
    (-0.3, -0.4, -0.3, 1.0, 0.1, 0.0, -0.2, 0.3, 0.0, 0.5, 0.4),  # 50-64
    (-0.8, -0.7, -0.6, 1.2, 0.0, -0.2, -0.3, 0.2, 0.3, 0.8, 0.1), # 65+
)
ZH_REGIONS = ("上海", "北京", "广东>深圳", "广东>广州", "浙江>杭州", "江苏>南京", "江苏>苏州", "四川>成都",
              "湖北>武汉", "陕西>西安", "重庆", "山东>青岛", "福建>厦门", "河南>郑州")
ZH_PRICE_PHRASES = ("便宜", "平价", "高端", "性价比高", "学生党", "大牌")
ZH_REVIEW_TEXT = {
    1: ("质量太差了，{noun}用了两天就坏了，不会再买了。", "和描述严重不符，差评！", "{noun}做工粗糙，已申请退货。"),
    2: ("{noun}一般般，和预期差距有点大。", "质量一般，对不起这个价格。", "有点失望，{noun}细节做得不好。"),
    3: ("{noun}还行吧，中规中矩。", "能用，没有特别惊喜。", "物流挺快的，{noun}质量普通。"),
    4: ("{noun}不错，挺满意的。", "质量挺好，物流也快。", "性价比可以，{noun}用着还不错。"),
    5: ("非常好！{noun}和描述的一模一样，好评！", "质量很好，物流超快，强烈推荐！",
        "第二次回购了，{noun}很好用，五星好评！"),
}
# Words a seller adds to a title to be found ("keyword stuffing"), and audiences that read "专用" after them.
ZH_TITLE_SUFFIXES = ("官方正品", "2025新款", "2026新款", "正品包邮", "旗舰店同款", "爆款")
ZH_FOR_WHOM = ("男士", "女士", "儿童", "学生")
ZH_TITLE_WIDTH = 30  # Taobao's limit: 60 bytes, a Chinese character two, a Latin letter or digit one

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.&'+-]*")


def query_length(text: str) -> int:
    """A query's length as a Chinese shopper types it: each CJK character and each Latin word or number
    counts one ("山水U3" is 3), so brand names and model numbers do not make a query look long."""
    return len(_CJK.findall(text)) + len(_LATIN.findall(text))


def _zh_width(text: str) -> float:
    """A title's width as Taobao counts it, in Chinese characters: ASCII is half of one."""
    return sum(0.5 if ch.isascii() else 1.0 for ch in text)


def _zh_join(parts: list[str]) -> str:
    """Title words without spaces, as Chinese titles are written; a space only where two Latin words or
    numbers would run together ("X14 16G内存") and after a "Latin/中文" brand, as Tmall titles have it."""
    out = ""
    for part in (p for p in parts if p):
        if out and (out[-1].isascii() and out[-1].isalnum() and part[0].isascii() and part[0].isalnum()):
            out += " "
        out += part
    return out


def _zh_item_text(rng: np.random.Generator, c: Category, noun: int, attr: int, brand: int) -> tuple[str, str]:
    """A Chinese listing: a keyword-stuffed title and its attribute pairs.

    ``海飞丝去屑洗发水男士专用控油清爽500ml官方正品``, ``Sansui/山水 U3无线蓝牙耳机降噪运动2026新款``;
    description ``品牌：海飞丝；功效：去屑；净含量：500ml；适用人群：男士``.
    """
    audience = c.audiences[rng.integers(0, len(c.audiences))]
    feature = c.features[rng.integers(0, len(c.features))]
    p = rng.integers(0, 1 << 20, 5)
    name, synonym = c.nouns[noun][0], c.nouns[noun][1]
    main = c.attributes[attr]
    other = c.attributes[(attr + 1 + p[0] % (len(c.attributes) - 1)) % len(c.attributes)]  # never ``main``
    main, other = ("" if w in name else w for w in (main, other))  # "降噪降噪耳机" reads as a typo
    model = c.models[p[1] % len(c.models)] if c.models and p[1] % 4 else ""
    size = c.sizes[p[2] % len(c.sizes)] if c.sizes else ""
    suffix = ZH_TITLE_SUFFIXES[p[3] % len(ZH_TITLE_SUFFIXES)]
    for_whom = audience + "专用" if audience in ZH_FOR_WHOM and p[4] % 2 else audience
    stuffed = synonym if p[0] % 3 == 0 and synonym not in name else ""
    head = c.brands[brand] + (" " if "/" in c.brands[brand] else "")
    if p[4] % 4 < 2:
        words = [head, model, main, name, for_whom, other, feature, stuffed, size, suffix]
    else:
        words = [head, model, suffix, main, other, name, feature, stuffed, audience, size]
    for optional in (stuffed, other, feature, suffix):  # over the limit: the seller drops filler first
        if _zh_width(_zh_join(words)) > ZH_TITLE_WIDTH and optional:
            words.remove(optional)
    pairs = (("品牌", c.brands[brand]), ("型号", model), (c.labels[0], c.attributes[attr]), (c.labels[1], size),
             (c.labels[2], audience))
    return _zh_join(words), "；".join(f"{k}：{v}" for k, v in pairs if k and v)


def _zh_brand_word(brand: str, pick: int) -> str:
    """How a shopper types a brand: its Chinese name ("山水"), now and then the Latin one in lower case."""
    latin, _, chinese = brand.partition("/")
    if not chinese:
        return brand
    return latin.lower().replace(" ", "") if pick % 5 == 0 else chinese


def _round_price(value: float) -> int:
    """A price cap as people say it: 200, 300, 6000 or 12000, never 5999."""
    digits = len(str(int(value)))
    step = 10 ** max(digits - (2 if digits >= 4 else 1), 0)
    return int(round(value / step) * step)


def _first_fitting(*candidates: str) -> str:
    """The first candidate 2-8 characters long (:func:`query_length`); else the last, always short."""
    for q in candidates:
        if 2 <= query_length(q) <= 8:
            return q
    return candidates[-1]


def _zh_query(c: Category, noun: int, attr: str, price: str, style: int, pick: int) -> str:
    """A short Chinese query (2-8 characters) in one of six styles: ``去屑洗发水``, ``平价洗发水``,
    ``男士洗面奶``, ``山水耳机``, ``耳机200以内``, ``蓝牙耳机降噪``. Longer forms give way to shorter ones."""
    synonyms = c.nouns[noun]
    word = synonyms[pick % len(synonyms)]
    attr = "" if attr in word else attr
    if style == 0:
        forms = (attr + word,)
    elif style == 1:
        forms = (price + attr + word, price + word)
    elif style == 2:
        audience = c.audiences[pick % len(c.audiences)]
        forms = (audience + attr + word, audience + word)
    elif style == 3:
        brand = _zh_brand_word(c.brands[(pick // 3) % len(c.brands)], pick)
        fine = c.path.rsplit(">", 1)[-1]
        model = c.models[pick % len(c.models)] if c.models and pick % 4 == 0 else ""
        forms = (brand + model, brand + word) if model else (brand + (fine if pick % 2 else word), brand)
    elif style == 4:
        cap = _round_price(c.median_price * (1 + pick % 3 * 0.5))
        forms = (f"{word}{cap}以内",) if pick % 2 else (f"{cap}元{word}",)
    else:
        forms = (word + attr,)
    return _first_fitting(*forms, word, synonyms[0])


@dataclass(frozen=True)
class Locale:
    """The words and the map of a shop; the behaviour that :func:`generate` simulates is shared.

    The simulation gives each slot a role, so the tuples keep their order and length: ``devices`` is
    (mobile web, app, desktop, tablet), ``channels`` follows ``CHANNEL_P`` with search second,
    ``genders`` is (women, men, other), ``membership`` four tiers from none up, ``occupations`` the
    student's, the retiree's, then those of working age. Each category needs 3 nouns, 5 attributes and
    4 brands (cheapest first), and ``gender_effect``/``age_effect`` one column per category.
    """

    name: str
    categories: tuple[Category, ...]
    gender_effect: tuple[tuple[float, ...], ...]  # women, men, other
    age_effect: tuple[tuple[float, ...], ...]  # < 25, 25-34, 35-49, 50-64, 65+
    regions: tuple[str, ...]
    devices: tuple[str, ...]
    channels: tuple[str, ...]
    genders: tuple[str, ...]
    occupations: tuple[str, ...]
    membership: tuple[str, ...]
    price_phrases: tuple[str, ...]
    review_text: Mapping[int, tuple[str, ...]]  # rating -> texts, each may name the {noun}; as many per rating
    item_text: Callable[[np.random.Generator, Category, int, int, int], tuple[str, str]]  # -> title, description
    query: Callable[[Category, int, str, str, int, int], str]  # category, noun, attribute, price phrase, style, pick

    def __post_init__(self) -> None:
        n_cat = len(self.categories)
        shapes = {"devices": (len(self.devices), 4), "channels": (len(self.channels), len(CHANNEL_P)),
                  "genders": (len(self.genders), 3), "membership": (len(self.membership), 4),
                  "gender_effect": (np.shape(self.gender_effect), (3, n_cat)),
                  "age_effect": (np.shape(self.age_effect), (5, n_cat))}
        shapes |= {f"{c.path} nouns/attributes/brands": ((len(c.nouns), len(c.attributes), len(c.brands)), (3, 5, 4))
                   for c in self.categories}
        wrong = [f"{k}: {got}, not {want}" for k, (got, want) in shapes.items() if got != want]
        if len(self.occupations) < 3:
            wrong.append("occupations: the student's, the retiree's and at least one more")
        if set(self.review_text) != {1, 2, 3, 4, 5} or len({len(t) for t in self.review_text.values()}) != 1:
            wrong.append("review_text: ratings 1 to 5, as many texts each")
        if wrong:
            raise ValueError(f"locale {self.name!r} does not fit the simulation's slots: {'; '.join(wrong)}")


EN = Locale(
    "en", CATEGORIES, GENDER_EFFECT, AGE_EFFECT, REGIONS, DEVICES, CHANNELS, ("female", "male", "other"),
    ("student", "retired", "engineer", "teacher", "designer", "nurse", "sales", "manager", "self-employed"),
    MEMBERSHIP, PRICE_PHRASES, REVIEW_TEXT, _en_item_text, _en_query,
)
ZH = Locale(
    "zh", ZH_CATEGORIES, ZH_GENDER_EFFECT, ZH_AGE_EFFECT, ZH_REGIONS,
    ("手机网页", "App", "电脑", "平板"),
    ("自然流量", "搜索", "推荐", "直播", "短信", "广告"),
    ("女", "男", "保密"),
    ("学生", "退休", "程序员", "教师", "设计师", "医护人员", "销售", "公务员", "个体经营"),
    ("非会员", "银卡会员", "金卡会员", "钻石会员"),
    ZH_PRICE_PHRASES, ZH_REVIEW_TEXT, _zh_item_text, _zh_query,
)
LOCALES: dict[str, Locale] = {"en": EN, "zh": ZH}


def get_locale(name: str) -> Locale:
    """The locale called ``name``; an unknown name fails with the ones there are."""
    try:
        return LOCALES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown locale {name!r}: use one of {', '.join(LOCALES)}") from None


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _pick(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a probability matrix."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def make_items(rng: np.random.Generator, n_items: int,
               locale: Locale = EN) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    categories = locale.categories
    n_cat = len(categories)
    cat = rng.choice(n_cat, size=n_items, p=_softmax(rng.normal(0, 0.3, n_cat)))
    noun = rng.integers(0, 3, n_items)
    attr = rng.integers(0, 5, n_items)
    brand = rng.integers(0, 4, n_items)
    quality = rng.normal(0, 1, n_items)
    premium = np.array([0.85, 1.0, 1.15, 1.35])[brand]
    medians = np.array([c.median_price for c in categories])[cat]
    price = np.round(medians * premium * np.exp(rng.normal(0, 0.35, n_items) + 0.1 * quality), 2)
    titles, brands, paths, descriptions = [], [], [], []
    for i in range(n_items):
        c = categories[cat[i]]
        title, description = locale.item_text(rng, c, noun[i], attr[i], brand[i])
        titles.append(title)
        brands.append(c.brands[brand[i]])
        paths.append(c.path)
        descriptions.append(description)
    items = pd.DataFrame({
        "item_id": [f"i{i:06d}" for i in range(n_items)],
        "title": titles, "category": paths, "brand": brands,
        "description": descriptions, "price": price,
    })
    latent = {"cat": cat, "noun": noun, "attr": attr, "quality": quality, "price": price}
    return items, latent


def make_users(rng: np.random.Generator, n_users: int, start: pd.Timestamp, end: pd.Timestamp,
               locale: Locale = EN) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    n_cat = len(locale.categories)
    regions = locale.regions
    age = np.clip(np.round(rng.gamma(6.0, 6.0, n_users) + 14), 16, 85).astype(int)
    gender = rng.choice(3, size=n_users, p=[0.52, 0.46, 0.02])
    region = rng.choice(len(regions), size=n_users, p=_softmax(rng.normal(0, 0.5, len(regions))))
    age_band = np.digitize(age, [25, 35, 50, 65])
    activity = rng.lognormal(0, 0.8, n_users)
    tier = np.clip(np.digitize(activity + rng.normal(0, 0.4, n_users), [1.0, 2.0, 3.2]), 0, 3)
    student, retired, *working = locale.occupations
    occupation = np.where(age < 23, student,
                 np.where(age >= 63, retired,
                 np.array(working)[rng.integers(0, len(working), n_users)]))
    g_eff, a_eff = np.array(locale.gender_effect), np.array(locale.age_effect)
    r_eff = np.random.default_rng(7).normal(0, 0.3, (len(regions), n_cat))
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
        "gender": np.array(locale.genders)[gender],
        "region": np.array(regions)[region],
        "occupation": occupation,
        "membership": np.array(locale.membership)[tier],
        "signup_timestamp": signup,
    })
    latent = {"base": base, "drift": drift, "price_sens": price_sens, "activity": activity,
              "age": age, "signup_offset": np.maximum(signup_offset, 0.0), "tier": tier}
    return users, latent


def _query_texts(rng: np.random.Generator, cat: np.ndarray, noun: np.ndarray, attr: np.ndarray,
                 has_attr: np.ndarray, locale: Locale = EN) -> list[str]:
    """One query per search session, in the locale's words; the style and wording are drawn here, so
    every locale's searches use the same random numbers."""
    style = rng.integers(0, 6, len(cat))
    pick = rng.integers(0, 1_000_000, len(cat))
    phrases = locale.price_phrases
    out = []
    for c_i, n_i, a_i, h, s, p in zip(cat, noun, attr, has_attr, style, pick, strict=True):
        c = locale.categories[c_i]
        out.append(locale.query(c, n_i, c.attributes[a_i] if h else "", phrases[p % len(phrases)], s, p))
    return out


def _draw_items(rng: np.random.Generator, it: dict[str, np.ndarray], pool: np.ndarray, noun_key: np.ndarray,
                cat_key: np.ndarray, n_cat: int) -> np.ndarray:
    """One item per row, by popularity, from its pool: 0 = the session's intent noun in its intent
    category, 1 = the intent category, 2 = the whole catalogue (``noun_key``: category * 3 + noun)."""
    n_items = len(it["cat"])
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
             end: pd.Timestamp = DEFAULT_END, *, locale: str = "en") -> dict[str, pd.DataFrame]:
    """Return the ``users``, ``items`` and ``events`` tables of a synthetic shop.

    ``locale`` (a key of ``LOCALES``) chooses the words and the map; the behaviour is the same.
    """
    loc = get_locale(locale)
    categories = loc.categories
    rng = np.random.default_rng(seed)
    end = pd.Timestamp(end).tz_convert("UTC") if pd.Timestamp(end).tzinfo else pd.Timestamp(end, tz="UTC")
    start = end - pd.Timedelta(days=days)
    window = float(days * 86400)
    items, it = make_items(rng, n_items, loc)
    users, us = make_users(rng, n_users, start, end, loc)
    n_cat = len(categories)

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
    s_channel = rng.choice(len(loc.channels), size=n_s, p=CHANNEL_P)
    weekday = ((start + pd.to_timedelta(s_t, unit="s")).dayofweek.to_numpy())
    leisure_time = ((s_hour >= 18) | (weekday >= 5)).astype(float) - 0.4
    morning = ((s_hour >= 6) & (s_hour < 10)).astype(float)
    leisure = np.array([c.leisure for c in categories])
    desktop = np.array([c.desktop for c in categories])
    coffee = np.array([c.morning for c in categories])
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
    v_item = _draw_items(rng, it, pool, s_cat[v_sess] * 3 + s_noun[v_sess], s_cat[v_sess], n_cat)

    noun_match = (key_noun[v_item] == s_cat[v_sess] * 3 + s_noun[v_sess]).astype(float)
    attr_match = ((it["attr"][v_item] == s_attr[v_sess]) & s_has_attr[v_sess]
                  & (it["cat"][v_item] == s_cat[v_sess])).astype(float)
    cat_match = (it["cat"][v_item] == s_cat[v_sess]).astype(float)
    v_user = s_user[v_sess]
    all_interest = us["base"][v_user] + (s_t[v_sess] / window)[:, None] * us["drift"][v_user]
    item_interest = np.log(_softmax(all_interest)[np.arange(n_v), it["cat"][v_item]] * n_cat)
    rel_price = np.log(it["price"][v_item] / np.array([c.median_price for c in categories])[it["cat"][v_item]])
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
    device_names = np.array(loc.devices, dtype=object)
    channel_names = np.array(loc.channels, dtype=object)
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
    rev_nouns = [categories[it["cat"][i]].nouns[it["noun"][i]][0] for i in v_item[reviewed]]
    picks = rng.integers(0, len(loc.review_text[1]), reviewed.sum())
    rev["text"] = [loc.review_text[int(r)][p].format(noun=n)
                   for r, p, n in zip(rating[reviewed], picks, rev_nouns, strict=True)]
    ss = np.flatnonzero(s_search)
    search = pd.DataFrame({
        "user_id": user_ids[s_user[ss]], "t": s_t[ss], "event_type": "search", "item_id": None,
        "session_id": session_ids[ss], "device": device_names[s_dev[ss]],
        "channel": channel_names[s_channel[ss]],
        "query": _query_texts(rng, s_cat[ss], s_noun[ss], s_attr[ss], s_has_attr[ss], loc),
    })

    # --- the wider funnel: impressions, favourites, later visits -----------------------------
    # Drawn after every other event, so a seed's sessions, views, clicks and carts stay as they were.
    listed = rng.random(n_v) < 0.85  # most views start from a list the item was shown in
    shown_t = v_t - rng.uniform(1, 30, n_v)
    n_unopened = rng.poisson(1.5, n_s)  # items shown in the session that nobody opened, less on target
    u_sess = np.repeat(np.arange(n_s), n_unopened)
    u_item = _draw_items(rng, it, _pick(rng, np.tile([0.2, 0.35, 0.45], (len(u_sess), 1))),
                         s_cat[u_sess] * 3 + s_noun[u_sess], s_cat[u_sess], n_cat)
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


def write(tables: dict[str, pd.DataFrame], out: Path, fmt: str = "csv", encoding: str = "utf-8") -> list[Path]:
    """Write contract files (``users.csv`` …) into ``out``; timestamps as ISO-8601 UTC.

    ``encoding="utf-8-sig"`` starts each CSV with a BOM, without which spreadsheet software reads
    non-English text in the system's code page (mojibake); the loader reads either.
    """
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
            frame.to_csv(path, index=False, date_format="%Y-%m-%dT%H:%M:%S.%fZ", encoding=encoding)
        paths.append(path)
    return paths
