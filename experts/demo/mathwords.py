"""Word problems with worked solutions for the math corpus: money, rates, geometry, statistics, time.

Each problem function takes (rng, render) and returns text; `render` (mathgen.render) chooses the layout.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

NAMES = ["Aisha", "Ben", "Carmen", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena",
         "Yusuf", "Zoe", "Mr. Alvarez", "Ms. Brooks", "Dr. Chen", "Grandma Ruth", "Liam", "Olivia", "Noah", "Emma",
         "Sofia", "Lucas", "Mia", "Ethan", "Hannah", "Kenji", "Amara", "Diego", "Freya", "Ivan", "Leila", "Marcus",
         "Nora", "Pedro", "Sven", "Tomás", "Yara", "Zainab", "Aunt Maria", "Coach Riley", "the baker", "a farmer"]
ITEMS = [("notebook", "notebooks", 1.5, 6), ("apple", "apples", 0.3, 1.2), ("pencil", "pencils", 0.25, 2),
         ("concert ticket", "concert tickets", 18, 85), ("loaf of bread", "loaves of bread", 2, 6),
         ("bag of rice", "bags of rice", 3, 15), ("T-shirt", "T-shirts", 6, 25), ("book", "books", 4, 30),
         ("plant pot", "plant pots", 2, 12), ("bus pass", "bus passes", 10, 60), ("cupcake", "cupcakes", 1, 4),
         ("pair of socks", "pairs of socks", 2, 9), ("movie ticket", "movie tickets", 7, 16),
         ("kilogram of cheese", "kilograms of cheese", 8, 25), ("carton of eggs", "cartons of eggs", 2, 5)]
CURRENCY = ["$", "€", "£"]
VEHICLES = [("car", 40, 110), ("train", 60, 180), ("cyclist", 12, 30), ("bus", 30, 80), ("walker", 3, 6),
            ("boat", 10, 40), ("truck", 50, 90)]
Render = Callable[[random.Random, str, list[str], str], str]


def _money(rng: random.Random, cur: str, x: float) -> str:
    return f"{cur}{x:,.2f}"


def shopping(rng: random.Random, render: Render) -> str:
    who, (_one, many, lo, hi) = rng.choice(NAMES), rng.choice(ITEMS)
    cur, n = rng.choice(CURRENCY), rng.randint(2, 12)
    price = round(rng.uniform(lo, hi) * 4) / 4 or lo
    total = n * price
    paid = math.ceil(total / 10) * 10 + rng.choice([0, 10, 20])
    steps = [f"The cost is {n} × {_money(rng, cur, price)} = {_money(rng, cur, total)}.",
             f"The change is {_money(rng, cur, paid)} - {_money(rng, cur, total)} = {_money(rng, cur, paid - total)}."]
    q = (f"{who} buys {n} {many} at {_money(rng, cur, price)} each and pays with {_money(rng, cur, paid)}. "
         f"{rng.choice(['How much change', 'What change', 'How much money'])} should {who} get back?")
    return render(rng, q, steps, _money(rng, cur, paid - total))


def distance(rng: random.Random, render: Render) -> str:
    who, (veh, lo, hi) = rng.choice(NAMES), rng.choice(VEHICLES)
    unit = rng.choice(["km", "miles"])
    speed, minutes = rng.randint(lo, hi), rng.choice([20, 30, 45, 50, 75, 90, 100, 120, 150, 210])
    dist = speed * minutes / 60
    kind = rng.randrange(3)
    if kind == 0:
        q = f"A {veh} travels at {speed} {unit} per hour for {minutes} minutes. How far does it go?"
        steps = [f"{minutes} minutes is {minutes}/60 = {minutes / 60:g} hours.",
                 f"Distance = speed × time = {speed} × {minutes / 60:g} = {dist:g} {unit}."]
        return render(rng, q, steps, f"{dist:g} {unit}")
    if kind == 1:
        q = f"{who} covers {dist:g} {unit} by {veh} in {minutes} minutes. What is the average speed in {unit} per hour?"
        steps = [f"Time in hours: {minutes}/60 = {minutes / 60:g} h.", f"Speed = {dist:g} ÷ {minutes / 60:g} = {speed} {unit}/h."]
        return render(rng, q, steps, f"{speed} {unit} per hour")
    other = rng.randint(lo, hi)
    gap = (speed + other) * minutes / 60
    q = (f"Two {veh}s start {gap:g} {unit} apart and head toward each other, one at {speed} {unit}/h and the other "
         f"at {other} {unit}/h. After how many minutes do they meet?")
    steps = [f"They close the gap at {speed} + {other} = {speed + other} {unit}/h.",
             f"Time = {gap:g} ÷ {speed + other} = {minutes / 60:g} hours = {minutes} minutes."]
    return render(rng, q, steps, f"{minutes} minutes")


def work_rate(rng: random.Random, render: Render) -> str:
    a, b = rng.sample(NAMES, 2)
    ta, tb = rng.choice([(2, 3), (3, 6), (4, 12), (6, 3), (5, 20), (10, 15), (4, 4), (12, 24), (6, 12)])
    task = rng.choice(["paint a fence", "mow the lawn", "sort the mail", "fill the pool", "grade the exams",
                       "pick the orchard"])
    both = ta * tb / (ta + tb)
    steps = [f"{a} does 1/{ta} of the job per hour and {b} does 1/{tb}.",
             f"Together: 1/{ta} + 1/{tb} = {ta + tb}/{ta * tb} of the job per hour.",
             f"Time = {ta * tb}/{ta + tb} = {both:.2f} hours."]
    q = f"{a} can {task} alone in {ta} hours; {b} needs {tb} hours. How long does it take if they work together?"
    return render(rng, q, steps, f"{both:.2f} hours")


def ages(rng: random.Random, render: Render) -> str:
    a, b = rng.sample(NAMES[:54], 2)
    young, k, years = rng.randint(3, 15), rng.randint(2, 4), rng.randint(2, 10)
    old = k * young
    steps = [f"Let {b}'s age be y, so {a} is {k}y.", (f"In {years} years: {k}y + {years} + y + {years} = "
             f"{old + young + 2 * years}."), f"{k + 1}y = {old + young}, so y = {young} and {a} is {old}."]
    q = (f"{a} is {k} times as old as {b}. In {years} years their ages will add up to {old + young + 2 * years}. "
         f"How old are they now?")
    return render(rng, q, steps, f"{a} is {old} and {b} is {young}")


def ratio_share(rng: random.Random, render: Render) -> str:
    names = rng.sample(NAMES, 2)
    r1, r2 = rng.randint(1, 7), rng.randint(1, 7)
    unit, cur = rng.randint(5, 60), rng.choice(CURRENCY)
    total = (r1 + r2) * unit
    steps = [f"There are {r1} + {r2} = {r1 + r2} parts.", f"One part is {cur}{total} ÷ {r1 + r2} = {cur}{unit}.",
             f"{names[0]} gets {r1} × {unit} = {cur}{r1 * unit}; {names[1]} gets {r2} × {unit} = {cur}{r2 * unit}."]
    q = f"{names[0]} and {names[1]} share {cur}{total} in the ratio {r1}:{r2}. How much does each receive?"
    return render(rng, q, steps, f"{cur}{r1 * unit} and {cur}{r2 * unit}")


CONVERSIONS = [("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
               ("hours", "minutes", 60), ("litres", "millilitres", 1000), ("feet", "inches", 12),
               ("yards", "feet", 3), ("pounds", "ounces", 16), ("days", "hours", 24), ("gallons", "quarts", 4)]


def convert(rng: random.Random, render: Render) -> str:
    big, small, f = rng.choice(CONVERSIONS)
    x = rng.choice([rng.randint(2, 40), rng.randint(2, 40) + 0.5, round(rng.uniform(0.1, 9), 1)])
    if rng.random() < 0.5:
        return render(rng, f"How many {small} are in {x:g} {big}?",
                      [f"1 {'foot' if big == 'feet' else big[:-1]} = {f} {small}.", f"{x:g} × {f} = {x * f:g}."], f"{x * f:g} {small}")
    n = int(x * f)
    return render(rng, f"Convert {n} {small} to {big}.", [f"Divide by {f}: {n} ÷ {f} = {n / f:g}."],
                  f"{n / f:g} {big}")


def rectangle(rng: random.Random, render: Render) -> str:
    who, place = rng.choice(NAMES), rng.choice(["garden", "room", "playground", "patio", "field", "poster"])
    w, l = rng.randint(2, 30), rng.randint(3, 45)
    unit = rng.choice(["m", "ft", "yd"])
    if rng.random() < 0.5:
        cost = rng.choice([2, 3, 5, 8, 12])
        steps = [f"Perimeter = 2 × ({l} + {w}) = {2 * (l + w)} {unit}.", f"Cost = {2 * (l + w)} × {cost} = {2 * (l + w) * cost}."]
        q = f"{who}'s rectangular {place} is {l} {unit} long and {w} {unit} wide. Fencing costs {cost} per {unit}. What does it cost to fence it?"
        return render(rng, q, steps, str(2 * (l + w) * cost))
    steps = [f"Area = length × width = {l} × {w} = {l * w} square {unit}."]
    return render(rng, f"A {place} measures {l} {unit} by {w} {unit}. What is its area?", steps, f"{l * w} {unit}²")


def circle(rng: random.Random, render: Render) -> str:
    r = rng.randint(1, 25)
    thing = rng.choice(["a round pond", "a pizza", "a circular table", "a clock face", "a roundabout"])
    if rng.random() < 0.5:
        return render(rng, f"{thing.capitalize()} has radius {r} cm. Find its area, using π ≈ 3.14.",
                      [f"A = πr² = 3.14 × {r}² = 3.14 × {r * r} = {3.14 * r * r:.2f}."], f"{3.14 * r * r:.2f} cm²")
    return render(rng, f"What is the circumference of {thing} with a diameter of {2 * r} m?",
                  [f"C = πd = π × {2 * r} ≈ {math.pi * 2 * r:.2f}."], f"about {math.pi * 2 * r:.2f} m")


def pythagoras(rng: random.Random, render: Render) -> str:
    a, b, c = rng.choice([(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10), (9, 12, 15), (20, 21, 29)])
    q = rng.choice([f"A {c} m ladder leans against a wall with its foot {a} m from the wall. How high up the wall does it reach?",
                    f"A right triangle has legs {a} and {b}. How long is the hypotenuse?"])
    if q.startswith("A right"):
        return render(rng, q, [f"c² = {a}² + {b}² = {a * a} + {b * b} = {c * c}.", f"c = √{c * c} = {c}."], str(c))
    return render(rng, q, [f"By Pythagoras, h² + {a}² = {c}².", f"h² = {c * c} - {a * a} = {b * b}, so h = {b}."], f"{b} m")


def average(rng: random.Random, render: Render) -> str:
    who = rng.choice(NAMES)
    xs = [rng.randint(55, 100) for _ in range(rng.randint(3, 6))]
    thing = rng.choice(["test scores", "daily step counts (in hundreds)", "bowling scores", "quiz marks"])
    s = sum(xs)
    steps = [f"Sum: {' + '.join(map(str, xs))} = {s}.", f"Mean = {s} ÷ {len(xs)} = {s / len(xs):.2f}."]
    if rng.random() < 0.4:
        ys = sorted(xs)
        mid = len(ys) // 2
        med = ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2
        steps.append(f"Sorted: {', '.join(map(str, ys))}; the median is {med:g}.")
        return render(rng, f"{who}'s {thing} are {', '.join(map(str, xs))}. Find the mean and the median.", steps,
                      f"mean {s / len(xs):.2f}, median {med:g}")
    return render(rng, f"{who}'s {thing} are {', '.join(map(str, xs))}. What is the average?", steps, f"{s / len(xs):.2f}")


def probability(rng: random.Random, render: Render) -> str:
    colours = rng.sample(["red", "blue", "green", "yellow", "white", "black"], 3)
    counts = [rng.randint(1, 12) for _ in colours]
    total = sum(counts)
    g = math.gcd(counts[0], total)
    if rng.random() < 0.6:
        steps = [f"There are {' + '.join(map(str, counts))} = {total} marbles.",
                 f"P({colours[0]}) = {counts[0]}/{total} = {counts[0] // g}/{total // g}."]
        q = (f"A bag holds {counts[0]} {colours[0]}, {counts[1]} {colours[1]} and {counts[2]} {colours[2]} marbles. "
             f"One is drawn at random. What is the probability it is {colours[0]}?")
        return render(rng, q, steps, f"{counts[0] // g}/{total // g}")
    s = rng.randint(3, 11)
    ways = sum(1 for i in range(1, 7) for j in range(1, 7) if i + j == s)
    g = math.gcd(ways, 36)
    return render(rng, f"Two fair dice are rolled. What is the probability that the total is {s}?",
                  ["There are 36 equally likely outcomes.", f"{ways} of them sum to {s}.",
                   f"P = {ways}/36 = {ways // g}/{36 // g}."], f"{ways // g}/{36 // g}")


def savings(rng: random.Random, render: Render) -> str:
    who, cur = rng.choice(NAMES), rng.choice(CURRENCY)
    goal, have, per = rng.randint(60, 900), rng.randint(0, 50), rng.randint(5, 40)
    weeks = math.ceil((goal - have) / per)
    thing = rng.choice(["a bicycle", "a guitar", "a tablet", "concert tickets", "a telescope", "new running shoes"])
    steps = [f"{who} still needs {cur}{goal} - {cur}{have} = {cur}{goal - have}.",
             f"{goal - have} ÷ {per} = {(goal - have) / per:.2f}, so round up to {weeks} weeks."]
    q = (f"{who} wants {thing} that costs {cur}{goal}, has saved {cur}{have}, and saves {cur}{per} a week. "
         f"How many weeks until {who} can afford it?")
    return render(rng, q, steps, f"{weeks} weeks")


def recipe(rng: random.Random, render: Render) -> str:
    serves, want = rng.choice([2, 4, 6, 8]), rng.choice([3, 5, 10, 12, 16])
    amount, ing = rng.choice([150, 200, 250, 300, 2, 3]), rng.choice(["flour", "sugar", "milk", "rice", "butter"])
    unit = "g" if amount > 10 else "cups"
    need = amount * want / serves
    steps = [f"Scale factor: {want} ÷ {serves} = {want / serves:g}.", f"{amount} × {want / serves:g} = {need:g} {unit}."]
    return render(rng, f"A recipe for {serves} people uses {amount} {unit} of {ing}. How much {ing} is needed for {want} people?",
                  steps, f"{need:g} {unit}")


def temperature(rng: random.Random, render: Render) -> str:
    if rng.random() < 0.5:
        c = rng.randint(-20, 40)
        return render(rng, f"Convert {c} °C to Fahrenheit.", ["F = C × 9/5 + 32.", f"{c} × 9/5 = {c * 9 / 5:g}.",
                      f"{c * 9 / 5:g} + 32 = {c * 9 / 5 + 32:g}."], f"{c * 9 / 5 + 32:g} °F")
    f = rng.randint(-4, 104)
    return render(rng, f"The thermometer reads {f} °F. What is that in Celsius?",
                  ["C = (F - 32) × 5/9.", f"({f} - 32) × 5/9 = {(f - 32) * 5 / 9:.1f}."], f"{(f - 32) * 5 / 9:.1f} °C")


def clock(rng: random.Random, render: Render) -> str:
    who = rng.choice(NAMES)
    h, m = rng.randint(6, 20), rng.choice(range(0, 60, 5))
    dur = rng.randint(25, 260)
    end = h * 60 + m + dur
    steps = [f"{dur} minutes is {dur // 60} h {dur % 60} min.", (f"{h:02d}:{m:02d} + {dur // 60} h {dur % 60} min = "
             f"{end // 60 % 24:02d}:{end % 60:02d}.")]
    act = rng.choice(["a train journey", "a football match", "a baking session", "a hike", "a flight", "an exam"])
    return render(rng, f"{who} starts {act} at {h:02d}:{m:02d}. It lasts {dur} minutes. When does it end?", steps,
                  f"{end // 60 % 24:02d}:{end % 60:02d}")


def discount_tax(rng: random.Random, render: Render) -> str:
    cur, price = rng.choice(CURRENCY), rng.randint(20, 400)
    off, tax = rng.choice([10, 15, 20, 25, 30, 40, 50]), rng.choice([5, 6, 8, 10, 20])
    sale = price * (100 - off) / 100
    final = sale * (100 + tax) / 100
    item = rng.choice(["jacket", "lamp", "pair of boots", "backpack", "printer", "chair"])
    steps = [f"Discount: {off}% of {cur}{price} = {cur}{price * off / 100:.2f}.", f"Sale price: {cur}{sale:.2f}.",
             f"Add {tax}% tax: {sale:.2f} × {1 + tax / 100:g} = {final:.2f}."]
    return render(rng, f"A {item} costs {cur}{price}. It is on sale for {off}% off, and then {tax}% sales tax is added. "
                  f"What is the final price?", steps, f"{cur}{final:.2f}")


def interest(rng: random.Random, render: Render) -> str:
    cur, p, r, t = rng.choice(CURRENCY), rng.randint(5, 100) * 100, rng.choice([2, 3, 4, 5, 6, 8]), rng.randint(2, 6)
    if rng.random() < 0.5:
        i = p * r * t / 100
        return render(rng, f"{rng.choice(NAMES)} deposits {cur}{p} at {r}% simple interest per year. How much interest is earned in {t} years?",
                      [f"I = P × r × t = {p} × {r / 100:g} × {t} = {i:g}."], f"{cur}{i:,.2f}")
    a = p * (1 + r / 100) ** t
    return render(rng, f"{cur}{p} is invested at {r}% interest compounded yearly. What is it worth after {t} years?",
                  [f"A = P(1 + r)^t = {p} × {1 + r / 100:g}^{t}.", f"{1 + r / 100:g}^{t} = {(1 + r / 100) ** t:.4f}.",
                   f"A = {a:.2f}."], f"{cur}{a:,.2f}")


def sequence(rng: random.Random, render: Render) -> str:
    a, d, n = rng.randint(1, 30), rng.randint(2, 9), rng.randint(8, 40)
    if rng.random() < 0.5:
        return render(rng, f"A theatre has {a} seats in the first row and each row has {d} more seats than the one "
                      f"before. How many seats are in row {n}?",
                      ["Row n has a + (n - 1)d seats.", f"{a} + {n - 1} × {d} = {a + (n - 1) * d}."], str(a + (n - 1) * d))
    s = n * (2 * a + (n - 1) * d) // 2
    return render(rng, f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...",
                  ["S = n/2 × (2a + (n - 1)d).", f"S = {n}/2 × ({2 * a} + {(n - 1) * d}) = {s}."], str(s))


def consecutive(rng: random.Random, render: Render) -> str:
    k, start = rng.choice([2, 3, 4, 5]), rng.randint(-5, 60)
    total = sum(range(start, start + k))
    steps = [f"Call the smallest n; the sum is {k}n + {k * (k - 1) // 2} = {total}.",
             f"{k}n = {total - k * (k - 1) // 2}, so n = {start}."]
    return render(rng, f"The sum of {k} consecutive integers is {total}. What are they?", steps,
                  ", ".join(str(start + i) for i in range(k)))


def leftovers(rng: random.Random, render: Render) -> str:
    who = rng.choice(NAMES)
    made, gave, box = rng.randint(30, 200), rng.randint(3, 25), rng.choice([4, 6, 8, 12])
    thing = rng.choice(["cookies", "muffins", "dumplings", "candles", "bracelets", "seedlings"])
    left = made - gave
    steps = [f"After giving some away: {made} - {gave} = {left}.", (f"{left} ÷ {box} = {left // box} full boxes "
             f"with {left % box} left over.")]
    q = f"{who} made {made} {thing}, gave {gave} to neighbours and packs the rest in boxes of {box}. How many full boxes are there?"
    return render(rng, q, steps, f"{left // box} boxes ({left % box} left over)")


def best_buy(rng: random.Random, render: Render) -> str:
    cur = rng.choice(CURRENCY)
    (s1, p1), (s2, p2) = [(rng.choice([250, 330, 500, 750, 1000, 1500]), round(rng.uniform(0.8, 6), 2)) for _ in range(2)]
    u1, u2 = p1 / s1 * 100, p2 / s2 * 100
    better = "the first" if u1 < u2 else "the second"
    steps = [f"First: {cur}{p1} ÷ {s1} × 100 = {cur}{u1:.3f} per 100 g.", f"Second: {cur}{p2} ÷ {s2} × 100 = {cur}{u2:.3f} per 100 g."]
    q = f"A {s1} g pack costs {cur}{p1:.2f} and a {s2} g pack costs {cur}{p2:.2f}. Which is the better value?"
    return render(rng, q, steps, f"{better} pack")


def box_volume(rng: random.Random, render: Render) -> str:
    l, w, h = rng.randint(10, 120), rng.randint(10, 60), rng.randint(10, 60)
    litres = l * w * h / 1000
    return render(rng, f"An aquarium is {l} cm long, {w} cm wide and {h} cm high. How many litres of water does it hold when full?",
                  [f"Volume = {l} × {w} × {h} = {l * w * h} cm³.", f"1 litre = 1000 cm³, so {l * w * h} cm³ = {litres:g} litres."],
                  f"{litres:g} litres")


WORD_PROBLEMS = [shopping, distance, work_rate, ages, ratio_share, convert, rectangle, circle, pythagoras, average,
                 probability, savings, recipe, temperature, clock, discount_tax, interest, sequence, consecutive,
                 leftovers, best_buy, box_volume]
