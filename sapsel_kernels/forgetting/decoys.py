"""Realistic decoys: the null population for the exposure of secrets that are not uniform strings.

Exposure (:mod:`sapsel_kernels.exposure`) ranks a secret by model log-likelihood among candidates of "the same
kind". For a card number or an API key the right candidates are uniform random strings of the secret's format. For
an email or a person's name they are not: a model that never saw ``teodor.lind@gmail.com`` still ranks it far above
``qzkx.wbtr@vnfq.mxe`` simply because it looks like an email, so random-letter candidates would report a large
exposure for a secret that was never memorised. The null for those secrets is a population of *plausible* emails
and names, which this module draws from built-in name and domain lists (no download, ASCII only):

* :func:`kind_of` -- ``"email"``, ``"name"`` or ``"format"`` for a secret;
* :func:`plausible` -- ``n`` distinct decoys of that kind, deterministic for a seed;
* :func:`null_description` -- one line naming the null, for reports.

The module imports only the standard library; :mod:`sapsel_kernels.exposure` (and so torch) is imported on the first
``"format"`` draw.
"""

from __future__ import annotations

import math
import operator
import random
import re
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple

__all__ = ["kind_of", "plausible", "null_description", "KINDS", "FIRST_NAMES", "LAST_NAMES", "DOMAINS",
           "WEBMAIL_DOMAINS", "ORG_DOMAINS", "EMAIL_PATTERNS"]

KINDS = ("email", "name", "format")


def _words(block: str) -> Tuple[str, ...]:
    """Whitespace-separated words of a block, duplicates dropped (first occurrence kept)."""
    return tuple(dict.fromkeys(block.split()))


# ------------------------------------------------------------------------------------------------------ name lists
# Given names, grouped loosely by language/region (ASCII transliterations, diacritics dropped).
FIRST_NAMES = _words("""
    James John Robert Michael William David Richard Joseph Thomas Charles Daniel Matthew Anthony Mark Steven Paul
    Andrew Joshua Kevin Brian George Edward Ryan Jacob Eric Jonathan Stephen Justin Scott Brandon Benjamin Samuel
    Patrick Jack Tyler Aaron Henry Adam Nathan Peter Kyle Ethan Noah Liam Oliver Owen Mary Patricia Jennifer Linda
    Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Margaret Sandra Ashley Emily Donna Michelle Amanda
    Melissa Rebecca Laura Sharon Amy Angela Anna Emma Olivia Grace Chloe Hannah Lily Megan Rachel Victoria Abigail
    Charlotte Amelia Isabella Ava Harper Evelyn Madison Zoe Siobhan Aoife Ciaran Niamh Declan Fiona Rhys Cerys
    Lukas Felix Maximilian Jonas Leon Florian Tobias Sebastian Stefan Jan Niklas Moritz Katharina Lena Johanna Julia
    Marie Sophie Leonie Anja Sabine Ulrike Kerstin Heike Jens Dirk Uwe Jurgen Sven Lars Erik Anders Nils Magnus
    Henrik Bjorn Astrid Ingrid Sigrid Freya Elin Linnea Maja Saga Teodor Axel Viggo Mette Kasper Rasmus Daan Bram
    Thijs Femke Sanne Lotte Anouk Aino Eero Mikko Aleksi
    Louis Hugo Gabriel Arthur Jules Mathis Theo Antoine Nicolas Julien Camille Manon Ines Lea Clara Amelie Margaux
    Juliette Elodie Baptiste
    Alejandro Javier Diego Carlos Pablo Sergio Miguel Jorge Mateo Santiago Lucia Carmen Sofia Valentina Paula Elena
    Martina Alba Ximena Gabriela Joao Pedro Tiago Rafael Bruno Beatriz Mariana Larissa Giulia Francesca Chiara
    Alessandro Matteo Lorenzo Giuseppe Marco Luca Federica Giovanni
    Piotr Krzysztof Tomasz Pawel Marcin Agnieszka Katarzyna Malgorzata Zofia Dmitri Sergei Ivan Alexei Nikolai
    Vladimir Olga Natalia Tatiana Irina Svetlana Anastasia Pavel Ondrej Jakub Tereza Petra Bogdan Milos Jelena
    Zoltan Istvan Reka Andrei Ioana Mihai
    Nikos Yannis Dimitris Eleni Katerina Mehmet Mustafa Ahmet Emre Elif Zeynep Ayse Omar Ahmed Mohammed Ali Hassan
    Youssef Karim Fatima Aisha Layla Noor Yasmin Amir Reza Parisa Shirin Navid Yosef Avi Noa Tamar Eitan
    Arjun Rohan Vikram Rahul Aditya Priya Ananya Divya Kavya Neha Sanjay Ravi Deepak Pooja Anjali Imran Farhan
    Ayesha Zainab Nimal Tharushi
    Wei Jing Hao Xin Ming Jun Mei Lan Yan Qiang Hiroshi Takeshi Kenji Yuki Haruto Sota Yui Sakura Aiko Emi Minjun
    Seojun Jiwoo Jisoo Minji Soyeon Thanh Minh Linh Anh Tuan Huong Somchai Malee Siti Budi Putri Rizal
    Chinedu Emeka Ngozi Chioma Oluwaseun Tunde Folake Kwame Kofi Ama Abena Thabo Sipho Lerato Zanele Wanjiru Amara
    Juma Baraka Amina Nia Tendai Kagiso Abebe Selam Moussa Awa
    Aroha Tane Keanu Leilani Sione Mateus Thiago Camila Renata Joaquin Florencia Valeria
""")

# Family names, same grouping.
LAST_NAMES = _words("""
    Smith Johnson Williams Brown Jones Miller Davis Wilson Anderson Taylor Moore Jackson Martin Thompson White
    Harris Clark Lewis Robinson Walker Young Allen King Wright Hill Green Adams Baker Nelson Carter Mitchell Roberts
    Turner Phillips Campbell Parker Evans Edwards Collins Stewart Morris Murphy Cook Rogers Morgan Cooper Reed
    Bailey Bell Kelly Howard Ward Cox Richardson Wood Watson Brooks Bennett Gray Hughes Price Sanders Foster Fisher
    Ellis Hayes Murray Russell Sullivan Gallagher Byrne Doyle Walsh Quinn Jenkins Fraser MacLeod Davies Llewellyn
    Mueller Schmidt Schneider Fischer Weber Meyer Wagner Becker Schulz Hoffmann Koch Richter Klein Wolf Schroeder
    Neumann Schwarz Zimmermann Braun Krueger Hartmann Lange Werner Krause Lehmann Kaiser Fuchs Vogel Jansen Visser
    Bakker Smit Mulder Dekker Vermeulen Lind Johansson Andersson Karlsson Nilsson Eriksson Larsson Olsson Persson
    Svensson Gustafsson Hansen Nielsen Jensen Pedersen Larsen Christensen Berg Haugen Dahl Lindqvist Holm Nyberg
    Virtanen Korhonen Nieminen Makinen
    Bernard Dubois Durand Leroy Moreau Simon Laurent Lefebvre Michel Fournier Girard Bonnet Dupont Lambert Fontaine
    Rousseau Vincent Blanc Chevalier Mercier
    Garcia Rodriguez Martinez Hernandez Lopez Gonzalez Perez Sanchez Ramirez Torres Flores Rivera Gomez Diaz
    Morales Ortiz Castillo Romero Alvarez Ruiz Navarro Dominguez Silva Santos Oliveira Souza Costa Pereira Ferreira
    Almeida Carvalho Ribeiro Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco Gallo Conti
    Mancini Giordano Rizzo Lombardi Moretti
    Nowak Kowalski Wisniewski Wojcik Kowalczyk Kaminski Lewandowski Zielinski Szymanski Ivanov Smirnov Kuznetsov
    Popov Sokolov Petrov Volkov Novak Svoboda Dvorak Horvat Kovac Nagy Toth Szabo Popescu Ionescu Petrovic Jovanovic
    Papadopoulos Georgiou Nikolaidis Yilmaz Kaya Demir Sahin Celik Ozturk Haddad Khalil Mansour Nasser Hussein
    Rahman Karimi Hosseini Ahmadi Cohen Levi Friedman Mizrahi Katz
    Patel Sharma Singh Kumar Gupta Reddy Iyer Nair Rao Mehta Shah Das Khan Chowdhury Hossain Perera Fernando
    Wang Li Zhang Liu Chen Yang Huang Zhao Wu Zhou Xu Sun Ma Zhu Lin Tanaka Suzuki Takahashi Watanabe Ito
    Yamamoto Nakamura Kobayashi Sato Kim Park Choi Jung Kang Cho Yoon Nguyen Tran Le Pham Hoang Phan Vu Dang
    Santoso Wijaya Saetang
    Okafor Okeke Adeyemi Ogunleye Eze Mensah Owusu Boateng Asante Dlamini Nkosi Ndlovu Khumalo Mokoena Kamau Otieno
    Mwangi Banda Phiri Diallo Traore Keita Toure Tesfaye Haile
    Ngata Kealoha Tupou Fonseca Vargas Rojas Herrera Medina Aguilar
""")

# Common webmail providers and plausible company / organisation / example domains.
WEBMAIL_DOMAINS = _words("""
    gmail.com yahoo.com hotmail.com outlook.com live.com msn.com icloud.com me.com aol.com protonmail.com proton.me
    gmx.de gmx.net web.de t-online.de mail.com yandex.ru mail.ru zoho.com fastmail.com hey.com yahoo.co.uk
    btinternet.com orange.fr free.fr laposte.net libero.it qq.com 163.com naver.com
""")
ORG_DOMAINS = _words("""
    example.com example.org example.net acme.com acme-corp.io contoso.com northwind.io globex.com initech.net
    hooli.io piedpiper.com vandelay.org umbrella-labs.net cyberdyne.io brightpath.io bluewave.de nordlicht.de
    greenfield.org summitpartners.com redwood-analytics.com harborview.net lakeside-clinic.org oakridge.edu
    riverbend.co.uk alpenblick.ch fjordtech.no meridian-health.com stadtwerke-ulm.de
""")
DOMAINS = WEBMAIL_DOMAINS + ORG_DOMAINS
_P_WEBMAIL = 0.5  # share of decoys on a webmail domain (the rest on a company / organisation domain)

# sub-address tags, used only when the secret has one ("jane+news@...")
_TAGS = _words("""
    news shop work spam lists github amazon newsletter promo bank travel receipts signup test dev alerts jobs social
    forum bills school family
""")


# -------------------------------------------------------------------------------------------------- kind detection
_EMAIL_ATOM = r"[A-Za-z0-9_%+\-]+"
_EMAIL_RE = re.compile(
    rf"(?P<local>{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*)"
    r"@(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})")


def _is_name_word(w: str) -> bool:
    """A capitalised word of letters: ``Lind``, ``McDonald``, ``Anne-Marie``, ``O'Brien``, ``José``."""
    parts = re.split(r"[-']", w)
    return (bool(w) and all(p and p.isalpha() for p in parts) and w[0].isupper()
            and any(c.islower() for c in w))


def kind_of(secret: str) -> str:
    """The kind of null a secret needs.

    * ``"email"``: ``local@domain.tld`` (local part of letters, digits, ``. _ % + -`` without empty dot-separated
      atoms; domain labels of letters, digits and inner hyphens; a TLD of >= 2 letters);
    * ``"name"``: 2-3 capitalised words of letters separated by single spaces (``"Teodor Lind"``,
      ``"Anne-Marie Dubois"``); a word needs a lowercase letter, so ``"ABC DEF"`` is not a name;
    * ``"format"`` otherwise (card and phone numbers, keys, codes): the null is uniform random strings of
      :func:`sapsel_kernels.exposure.format_of` ``(secret)``.
    """
    if not isinstance(secret, str):
        raise TypeError(f"secret must be a str, got {type(secret).__name__}")
    if _EMAIL_RE.fullmatch(secret):
        return "email"
    words = secret.split(" ")
    if 2 <= len(words) <= 3 and all(_is_name_word(w) for w in words):
        return "name"
    return "format"


# ---------------------------------------------------------------------------------------------------- email decoys
class _Parts(NamedTuple):
    f: str   # first name
    l: str   # last name  # noqa: E741
    fi: str  # first initial
    li: str  # last initial
    mi: str  # middle initial
    nn: str  # two digits
    num: str  # digit suffix: two digits, a birth year or three digits
    year: str  # birth year


_YEARS = (1955, 2010)  # birth years used in suffixes: range(*_YEARS)
_N_NUM = 100 + (_YEARS[1] - _YEARS[0]) + 900  # distinct values of _Parts.num


def _num(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return f"{rng.randrange(100):02d}"
    if r < 0.85:
        return str(rng.randrange(*_YEARS))
    return str(rng.randrange(100, 1000))


_NF, _NL = len(FIRST_NAMES), len(LAST_NAMES)
_NFI = len({n[0] for n in FIRST_NAMES})
_NLI = len({n[0] for n in LAST_NAMES})
_NY = _YEARS[1] - _YEARS[0]

# (name, weight ~ how common the pattern is, builder, upper bound on distinct local parts)
EMAIL_PATTERNS: Tuple[Tuple[str, int, Callable[[_Parts], str], int], ...] = (
    ("first.last", 20, lambda p: f"{p.f}.{p.l}", _NF * _NL),
    ("flast", 12, lambda p: f"{p.fi}{p.l}", _NFI * _NL),
    ("firstlast", 10, lambda p: f"{p.f}{p.l}", _NF * _NL),
    ("first_last", 6, lambda p: f"{p.f}_{p.l}", _NF * _NL),
    ("first.lastNN", 8, lambda p: f"{p.f}.{p.l}{p.nn}", _NF * _NL * 100),
    ("first+digits", 8, lambda p: f"{p.f}{p.num}", _NF * _N_NUM),
    ("f.last", 6, lambda p: f"{p.fi}.{p.l}", _NFI * _NL),
    ("first.l", 4, lambda p: f"{p.f}.{p.li}", _NF * _NLI),
    ("firstl", 3, lambda p: f"{p.f}{p.li}", _NF * _NLI),
    ("last.first", 4, lambda p: f"{p.l}.{p.f}", _NF * _NL),
    ("first-last", 3, lambda p: f"{p.f}-{p.l}", _NF * _NL),
    ("lastf", 3, lambda p: f"{p.l}{p.fi}", _NFI * _NL),
    ("first", 2, lambda p: p.f, _NF),
    ("last+digits", 4, lambda p: f"{p.l}{p.num}", _NL * _N_NUM),
    ("firstlastYYYY", 3, lambda p: f"{p.f}{p.l}{p.year}", _NF * _NL * _NY),
    ("fmlast", 3, lambda p: f"{p.fi}{p.mi}{p.l}", _NFI * _NFI * _NL),
)
_PATTERN_CUM = tuple(sum(p[1] for p in EMAIL_PATTERNS[:i + 1]) for i in range(len(EMAIL_PATTERNS)))


def _style(text: str) -> str:
    """``"lower"`` (no uppercase letter), ``"upper"`` (letters, all uppercase) or ``"title"`` (mixed)."""
    letters = [c for c in text if c.isalpha()]
    if not any(c.isupper() for c in letters):
        return "lower"
    if all(c.isupper() for c in letters):
        return "upper"
    return "title"


def _cased(word: str, style: str) -> str:
    return word.upper() if style == "upper" else word.capitalize() if style == "title" else word.lower()


def _cased_domain(domain: str, style: str) -> str:
    if style == "upper":
        return domain.upper()
    if style == "title":  # "Example.com": the organisation's label capitalised, the rest as usual
        head, _, rest = domain.partition(".")
        return head.capitalize() + "." + rest
    return domain.lower()


def _email_capacity(tagged: bool) -> int:
    """Upper bound on the number of distinct decoy emails (patterns may overlap, so the true count is lower)."""
    return sum(p[3] for p in EMAIL_PATTERNS) * len(DOMAINS) * (len(_TAGS) if tagged else 1)


def _email_decoys(secret: str, n: int, rng: random.Random, excluded: set) -> List[str]:
    m = _EMAIL_RE.fullmatch(secret)
    local, domain = m.group("local"), m.group("domain")
    lstyle, dstyle = _style(local), _style(domain)
    tagged = "+" in local
    cap = _email_capacity(tagged)
    if n > cap:
        raise ValueError(f"cannot draw {n} distinct plausible emails: the lists give at most {cap}")
    ex = {e.casefold() for e in excluded}  # emails are compared case-insensitively: "Jane.Doe@x" is "jane.doe@x"
    out: List[str] = []
    seen = set(ex)
    attempts, budget = 0, 20 * n + 1000
    while len(out) < n and attempts < budget:
        attempts += 1
        f, l_, mid = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(FIRST_NAMES)
        parts = _Parts(f=_cased(f, lstyle), l=_cased(l_, lstyle), fi=_cased(f[0], lstyle), li=_cased(l_[0], lstyle),
                       mi=_cased(mid[0], lstyle), nn=f"{rng.randrange(100):02d}", num=_num(rng),
                       year=str(rng.randrange(*_YEARS)))
        pattern = rng.choices(EMAIL_PATTERNS, cum_weights=_PATTERN_CUM)[0]
        pool = WEBMAIL_DOMAINS if rng.random() < _P_WEBMAIL else ORG_DOMAINS
        dom = _cased_domain(rng.choice(pool), dstyle)
        loc = pattern[2](parts)
        if tagged:
            tag = rng.choice(_TAGS)
            loc += "+" + (tag.upper() if lstyle == "upper" else tag)
        e = f"{loc}@{dom}"
        key = e.casefold()
        if key not in seen:
            seen.add(key)
            out.append(e)
    if len(out) < n:
        raise ValueError(f"could draw only {len(out)} distinct plausible emails of the {n} asked for "
                         f"({attempts} attempts; the secret and exclude removed)")
    return out


# ----------------------------------------------------------------------------------------------------- name decoys
def _name_decoys(secret: str, n: int, rng: random.Random, excluded: set) -> List[str]:
    words = len(secret.split(" "))
    nf, nl = len(FIRST_NAMES), len(LAST_NAMES)
    first_set, last_set = set(FIRST_NAMES), set(LAST_NAMES)
    if words == 2:
        cap = nf * nl

        def name(i):
            return f"{FIRST_NAMES[i // nl]} {LAST_NAMES[i % nl]}"

        def in_space(s):
            w = s.split(" ")
            return len(w) == 2 and w[0] in first_set and w[1] in last_set
    else:  # first + middle (another first name, never the same) + last
        cap = nf * (nf - 1) * nl

        def name(i):
            i, last = divmod(i, nl)
            fi, mi = divmod(i, nf - 1)
            mi += mi >= fi  # skip the first name itself
            return f"{FIRST_NAMES[fi]} {FIRST_NAMES[mi]} {LAST_NAMES[last]}"

        def in_space(s):
            w = s.split(" ")
            return len(w) == 3 and w[0] in first_set and w[1] in first_set and w[0] != w[1] and w[2] in last_set
    n_ex = sum(1 for e in excluded if in_space(e))
    avail = cap - n_ex
    if n > avail:
        raise ValueError(f"cannot draw {n} distinct plausible {words}-word names: only {avail} exist "
                         f"({nf} first x {nl} last names, the secret and exclude removed)")
    # uniform without replacement over the whole space; n_ex extra indices cover the excluded names
    picks = (name(i) for i in rng.sample(range(cap), min(cap, n + n_ex)))
    return [s for s in picks if s not in excluded][:n]


# --------------------------------------------------------------------------------------------------- format decoys
def _format_decoys(secret: str, n: int, seed: int, excluded: set) -> List[str]:
    from . import exposure  # lazy: exposure imports torch

    fmt = exposure.format_of(secret)
    pos = exposure.parse_format(fmt)
    size = math.prod(len(a) for a in pos)
    avail = size - sum(1 for e in excluded if exposure.matches_positions(e, pos))
    if n > avail:
        raise ValueError(f"cannot draw {n} distinct strings of the format {fmt!r}: only {avail} exist "
                         "besides the secret and exclude")
    if n == 0:
        return []
    # random_candidates draws with replacement; a longer draw with the same seed extends the shorter one, so the
    # first n distinct of the stream are exactly random_candidates(n, ...) whenever that has no repeat (the rule for
    # any realistic format), and still well defined when the space is small
    m = n
    while True:
        out = list(dict.fromkeys(exposure.random_candidates(m, fmt, seed=seed, exclude=sorted(excluded))))
        if len(out) >= n:
            return out[:n]
        m = max(2 * m, m + 4 * (n - len(out)))


# ------------------------------------------------------------------------------------------------------- public API
def plausible(secret: str, n: int, *, seed: int = 0, exclude: Iterable[str] = (),
              kind: Optional[str] = None) -> List[str]:
    """``n`` distinct decoys of the secret's kind (:func:`kind_of`, or ``kind``), none equal to the secret or in
    ``exclude``, drawn with ``random.Random(seed)`` (the same list for the same arguments on every run).

    * ``"email"``: local parts from the first/last-name lists in :data:`EMAIL_PATTERNS` (``first.last``, ``flast``,
      ``first_last``, ``firstlast``, ``first.last`` + 2 digits, ``first`` + digits or birth year, ...; weighted by
      how common they are) at a domain from :data:`DOMAINS` (half webmail, half company/organisation). The secret's
      visible style is mirrored: letter case of the local part and of the domain separately (all lowercase, all
      uppercase, or capitalised words), and a ``+tag`` sub-address when the secret has one. Emails are compared
      case-insensitively with the secret and ``exclude``.
    * ``"name"``: ``First Last`` (or ``First Middle Last`` for a three-word secret), uniform without replacement
      over the combinations of :data:`FIRST_NAMES` and :data:`LAST_NAMES`.
    * ``"format"``: ``exposure.random_candidates(n, format_of(secret), seed=seed, exclude=[secret, *exclude])``
      (repeats dropped and replaced by later draws of the same stream).

    ``exclude``: strings to avoid (e.g. decoys already used; a single str counts as one string). ValueError for
    ``n < 0``, an unknown ``kind``, a kind that does not apply to the secret (``"email"`` for a non-email, ``"name"``
    for a non-name; ``"format"`` applies to every secret), or when ``n`` distinct decoys cannot be drawn (the
    message says how many could).
    """
    detected = kind_of(secret)
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if kind is None:
        kind = detected
    elif kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (or None to detect it), got {kind!r}")
    elif kind != "format" and kind != detected:
        raise ValueError(f"kind {kind!r} does not apply to the secret {secret!r} (it looks like {detected!r}: "
                         f"see kind_of)")
    if isinstance(exclude, str):
        exclude = (exclude,)
    excluded = {secret, *(e for e in exclude if isinstance(e, str))}
    if kind == "format":
        return _format_decoys(secret, n, seed, excluded)
    rng = random.Random(seed)
    if kind == "email":
        return _email_decoys(secret, n, rng, excluded)
    return _name_decoys(secret, n, rng, excluded)


def null_description(kind: str, fmt: Optional[str] = None) -> str:
    """One line naming the null population of a kind, for reports (``fmt``: the format, for ``"format"``)."""
    if kind == "email":
        return (f"plausible emails ({len(EMAIL_PATTERNS)} first/last-name patterns x {len(FIRST_NAMES)} first x "
                f"{len(LAST_NAMES)} last names x {len(DOMAINS)} domains)")
    if kind == "name":
        return (f"plausible person names ({len(FIRST_NAMES)} first x {len(LAST_NAMES)} last names, a first name "
                "as middle name for three words)")
    if kind == "format":
        return ("uniform random strings of the secret's format" if fmt is None
                else f"uniform random strings of the format {fmt!r}")
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
