"""Picture → poem keywords: the concept lexicon a tagger learns, and colour cues read from pixels.

A tagger (atelier/models/tagger.py) is trained on the emoji in ../shared/data/images/emoji64,
whose only labels are their Unicode names ("RED APPLE", "SMILING FACE WITH OPEN MOUTH"). The
lexicon below turns a name into *concepts*: each is one classical-Chinese keyword a poem can
be written around (果 fruit, 笑 smile, 月 moon …) with the English words that call it up. Names
that call up none (signs, letters, arrows) still train the tagger, as pictures of nothing.

Colour is not learnt: the emoji names rarely say it and the pixels always do. `colour_cue`
takes the saturated pixels' dominant hue (or white for a pale, unsaturated picture) and names
it as a poet would (红 黄 绿 碧 紫 白).

    >>> sorted(CONCEPTS[i].keyword for i in concepts_of("RED APPLE"))
    ['果']
    >>> colour_cue(np.full((8, 8, 3), (220, 30, 40), np.uint8))["keyword"]
    '红'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Concept:
    keyword: str  # the character a poem is written around
    gloss: str  # what it means, in English, for people reading the tags
    triggers: tuple[str, ...]  # words (or "two words") of an emoji name that call it up


def _c(keyword: str, gloss: str, triggers: str) -> Concept:
    return Concept(keyword, gloss, tuple(t.strip() for t in triggers.split(",")))


# Chosen for how often Tang and Song poets write them and how many emoji show them; every
# keyword is a character the shipped tang-poet knows (a test checks it).
CONCEPTS: tuple[Concept, ...] = (
    # feelings, faces, people
    _c("笑", "smile", "smiling, smile, grinning, grin, laughing, joy, happy, beaming, smiley, relieved"),
    _c("泪", "tears", "tears, tear, crying, sob, sobbing"),
    _c("愁", "sorrow", "frowning, sad, disappointed, worried, pensive, anguished, persevering, confounded, weary, "
                        "tired, anxious, downcast"),
    _c("怒", "anger", "angry, pouting, rage, enraged"),
    _c("惊", "surprise", "astonished, surprised, screaming, fearful, shocked, hushed, flushed"),
    _c("眠", "sleep", "sleeping, sleepy, sleep, zzz"),
    _c("心", "heart, love", "heart, hearts, love, kissing, kiss"),
    _c("人", "person", "person, man, woman, adult, men, women, people"),
    _c("童", "child", "child, baby, boy, girl"),
    _c("老", "old age", "older, old"),
    _c("手", "hand", "hand, hands, fist, clapping, waving, handshake"),
    _c("舞", "dance", "dancer, dancing, dance, ballet"),
    _c("歌", "song", "musical, microphone, singer, notes, music"),
    _c("琴", "lute, strings", "guitar, violin, banjo, harp, lyre"),
    _c("鼓", "drum", "drum"),
    # animals
    _c("马", "horse", "horse, unicorn, pony"),
    _c("牛", "ox", "ox, cow, bison, buffalo"),
    _c("羊", "sheep", "sheep, ram, goat, ewe"),
    _c("犬", "dog", "dog, poodle, puppy, hound"),
    _c("猫", "cat", "cat, kitten"),
    _c("鸡", "rooster", "chicken, rooster, chick, hatching"),
    _c("鸟", "bird", "bird, dove, eagle, owl, parrot, peacock, swan, flamingo, penguin, duck, chick, goose"),
    _c("鱼", "fish", "fish, blowfish, shark, dolphin, koi"),
    _c("龙", "dragon", "dragon"),
    _c("虎", "tiger", "tiger, leopard"),
    _c("猿", "ape", "monkey, gorilla, orangutan"),
    _c("蛇", "snake", "snake"),
    _c("兔", "rabbit", "rabbit, bunny"),
    _c("鹿", "deer", "deer, moose"),
    _c("熊", "bear", "bear"),
    _c("蝶", "butterfly", "butterfly"),
    _c("蜂", "bee", "bee, honeybee"),
    _c("虫", "insect", "bug, ant, beetle, cricket, worm, caterpillar, spider, mosquito, fly"),
    # plants and fruit
    _c("花", "flower", "flower, blossom, rose, tulip, hibiscus, sunflower, bouquet, daisy"),
    _c("莲", "lotus", "lotus"),
    _c("竹", "bamboo", "bamboo, tanabata"),
    _c("松", "pine", "pine, evergreen, christmas tree"),
    _c("树", "tree", "tree, trees, deciduous, palm tree"),
    _c("叶", "leaf", "leaf, leaves, maple"),
    _c("草", "grass", "herb, seedling, shamrock, clover, grass, sheaf"),
    _c("果", "fruit", "apple, pear, grapes, melon, watermelon, cherries, strawberry, banana, pineapple, mango, "
                      "kiwifruit, tangerine, lemon, peach, coconut, blueberries, fruit"),
    _c("桃", "peach", "peach"),
    _c("春", "spring", "cherry blossom, seedling, tulip"),
    _c("秋", "autumn", "maple, fallen, harvest, chestnut"),
    # food and drink
    _c("酒", "wine", "wine, sake, beer, beers, cocktail, tumbler, champagne, clinking"),
    _c("茶", "tea", "tea, teacup, teapot"),
    # sky, weather, landscape
    _c("日", "sun", "sun, sunrise, sunset, sunny"),
    _c("月", "moon", "moon, crescent"),
    _c("星", "star", "star, stars, glowing, shooting, milky way"),
    _c("夜", "night", "night, milky way, crescent"),
    _c("云", "cloud", "cloud, clouds"),
    _c("雨", "rain", "rain, raining, droplet, umbrella"),
    _c("雪", "snow", "snow, snowflake, snowman, snowboarder, skier"),
    _c("风", "wind", "wind, tornado, dash, wind chime"),
    _c("雷", "thunder", "lightning, thunder, voltage"),
    _c("虹", "rainbow", "rainbow"),
    _c("山", "mountain", "mountain, fuji, volcano, mount"),
    _c("水", "water", "water, droplet, splashing, potable"),
    _c("海", "sea", "ocean, sea, wave, island, beach"),
    _c("火", "fire", "fire, flame, fireworks, volcano, campfire"),
    _c("烟", "mist", "fog, foggy, smoke"),
    # things and places
    _c("舟", "boat", "boat, sailboat, rowboat, canoe, ship, speedboat, ferry, anchor"),
    _c("车", "carriage", "car, automobile, bus, taxi, truck, tram, train, bicycle, cart"),
    _c("楼", "tower, hall", "building, buildings, office, tower, hotel, department store, castle, stadium"),
    _c("家", "home", "house, home, hut"),
    _c("城", "city", "castle, cityscape, city"),
    _c("桥", "bridge", "bridge"),
    _c("门", "gate", "door, gate, torii"),
    _c("灯", "lamp", "lantern, bulb, candle, lamp, diya"),
    _c("书", "book", "book, books, notebook, scroll, ledger"),
    _c("剑", "sword", "sword, swords, dagger"),
    _c("弓", "bow", "bow and, archery"),
    _c("钟", "bell", "bell, clock, alarm, hourglass"),
    _c("衣", "robe", "shirt, dress, kimono, coat, sari, clothes, robe"),
    _c("金", "gold", "gold, medal, coin, money, trophy, crown"),
    _c("笔", "brush", "pen, pencil, paintbrush, crayon"),
    _c("画", "painting", "palette, artist, painting, framed picture"),
    _c("寺", "temple", "temple, shrine, mosque, church, synagogue, pagoda"),
    _c("路", "road", "road, railway, motorway, track"),
)

_WORD = re.compile(r"[a-z]+")


def name_words(name: str) -> list[str]:
    return _WORD.findall(name.lower())


def concepts_of(name: str) -> set[int]:
    """Indices into CONCEPTS that an emoji name calls up. A trigger of two words must appear as
    those two words in a row; a one-word trigger also matches its plural with -s."""
    words = name_words(name)
    single = set(words) | {w[:-1] for w in words if w.endswith("s")}
    pairs = {" ".join(words[i:i + 2]) for i in range(len(words) - 1)}
    return {i for i, c in enumerate(CONCEPTS)
            if any((t in pairs) if " " in t else (t in single) for t in c.triggers)}


# Hue ranges (degrees) → the colour word a poet uses; checked in order, red wraps around 0.
HUES = (("红", "red", 345, 360), ("红", "red", 0, 18), ("黄", "yellow", 18, 68), ("绿", "green", 68, 165),
        ("碧", "blue", 165, 255), ("紫", "purple", 255, 345))


def colour_cue(image: np.ndarray, *, min_share: float = 0.12) -> dict | None:
    """The picture's colour as a poem keyword ({keyword, gloss, share}), or None when nothing stands out.

    Near-white pixels are background (emoji and drawings sit on white). Among the rest, each
    saturated pixel votes for its hue range; the winner must hold `min_share` of the whole
    picture and most of the saturated pixels. A picture that is mostly pale and unsaturated is 白."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3] / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    background = mn > 0.94
    chroma = mx - mn
    saturated = (chroma > 0.25) & (mx > 0.25) & ~background
    total = rgb.shape[0] * rgb.shape[1]
    if saturated.sum() >= min_share * total:
        r, g, b = (rgb[..., k][saturated] for k in range(3))
        c, m = chroma[saturated], mx[saturated]
        hue = np.where(m == r, ((g - b) / c) % 6, np.where(m == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
        votes: dict[str, float] = {}
        for keyword, gloss, lo, hi in HUES:
            votes[keyword] = votes.get(keyword, 0.0) + float(((hue >= lo) & (hue < hi)).sum())
        keyword = max(votes, key=votes.get)
        if votes[keyword] >= 0.5 * saturated.sum():
            gloss = next(g for k, g, _, _ in HUES if k == keyword)
            return {"keyword": keyword, "gloss": gloss, "share": round(votes[keyword] / total, 3)}
        return None
    pale = ~background & (mn > 0.7) & (chroma < 0.12)
    if pale.sum() >= 2 * min_share * total:
        return {"keyword": "白", "gloss": "white", "share": round(float(pale.sum()) / total, 3)}
    return None


__all__ = ["CONCEPTS", "Concept", "colour_cue", "concepts_of", "name_words"]
