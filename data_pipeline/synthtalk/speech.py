"""Speech for SynthTalk clips: espeak-ng text-to-speech, or a numpy formant synthesiser.

`synthesize_speech(rng, identity, seconds, engine)` returns exactly `seconds` of 16 kHz mono
float32 audio plus JSON-able attrs (engine, text, voice, ...). "espeak" speaks random
sentences (templates over built-in word lists, a few languages) with SSML pauses between
phrases; "formant" is the dependency-free fallback: a glottal pulse train with a pitch
contour through time-varying formant resonators (vowels), noise bursts and fricatives
(consonants), nasal murmurs and pauses. "auto" uses espeak-ng when it is on PATH.

Both are normalised so that the loud frames sit at `REFERENCE_RMS`: the mouth motion is
derived from the audio envelope relative to that level (see motion.py), so every clip maps
loudness to mouth opening the same way.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import numpy as np

from data_pipeline.schema import FPS, SAMPLE_RATE
from data_pipeline.synthtalk.identity import Identity

ENGINES = ("auto", "espeak", "formant")
REFERENCE_RMS = 0.1  # 95th percentile of per-frame RMS after normalisation

# ----------------------------------------------------------------------------- text

_EN = {
    "det": "the a this that my your our their every one".split(),
    "adj": (
        "quick small big old new bright quiet happy long short green blue warm cold early "
        "late simple strange gentle heavy little lovely busy clever"
    ).split(),
    "noun": (
        "garden window river morning teacher market problem picture station story kitchen "
        "letter mountain friend question country evening doctor minute answer music table "
        "paper summer winter village machine number idea family"
    ).split(),
    "verb": (
        "opens finds moves changes brings follows watches carries builds remembers paints "
        "reaches closes explains keeps leaves needs shows turns wants"
    ).split(),
    "adv": "slowly today again quickly often never always nearly suddenly gently".split(),
    "prep": "near under behind across over beside into through".split(),
    "start": "well so actually honestly anyway now look yes".split(),
}
_TEMPLATES = (
    "det adj noun verb det noun",
    "det noun verb det adj noun adv",
    "start det noun verb prep det noun",
    "det adj noun adv verb det noun prep det noun",
    "det noun verb adv",
)
# Other languages: short word lists spoken in random order (espeak reads them in that
# language's phonology; the content does not need to be grammatical).
_WORDS = {
    "de": (
        "der die das und ist nicht ein mit auf heute morgen immer wieder schnell langsam "
        "Garten Fenster Wasser Stadt Sommer Abend Freund Frage Antwort Musik Tisch Papier "
        "gehen kommen sehen machen sagen finden bringen denken"
    ).split(),
    "fr-fr": (
        "le la les et est une avec sur dans aujourd'hui demain toujours encore vite "
        "jardin fenêtre rivière matin maison question réponse musique table papier ville "
        "aller venir voir faire dire trouver porter penser"
    ).split(),
    "es": (
        "el la los y es una con sobre en hoy mañana siempre otra vez rápido despacio "
        "jardín ventana río mañana casa pregunta respuesta música mesa papel ciudad "
        "ir venir ver hacer decir encontrar llevar pensar"
    ).split(),
    "it": (
        "il la gli e è una con su in oggi domani sempre ancora presto piano giardino "
        "finestra fiume mattina casa domanda risposta musica tavolo carta città andare "
        "venire vedere fare dire trovare portare pensare"
    ).split(),
    "nl": (
        "de het een en is niet met op vandaag morgen altijd weer snel langzaam tuin "
        "raam rivier ochtend huis vraag antwoord muziek tafel papier stad gaan komen "
        "zien maken zeggen vinden brengen denken"
    ).split(),
}


def random_phrases(rng: np.random.Generator, language: str, num_words: int) -> list[str]:
    """Random phrases (3-9 words each) totalling at least `num_words` words."""
    phrases, count = [], 0
    while count < num_words:
        if language.startswith("en"):
            template = _TEMPLATES[rng.integers(len(_TEMPLATES))].split()
            words = [_EN[slot][rng.integers(len(_EN[slot]))] for slot in template]
        else:
            vocab = _WORDS[language]
            words = [vocab[i] for i in rng.integers(len(vocab), size=int(rng.integers(3, 8)))]
        phrases.append(" ".join(words))
        count += len(words)
    return phrases


# ----------------------------------------------------------------------------- espeak-ng


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV bytes -> (float32 [N], rate). espeak-ng's stdout header has bogus
    chunk sizes (it streams), so the data chunk is taken to the end of the bytes."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not produce a WAV stream")
    pos, rate, bits, channels = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if cid == b"fmt ":
            channels = int.from_bytes(data[pos + 10 : pos + 12], "little")
            rate = int.from_bytes(data[pos + 12 : pos + 16], "little")
            bits = int.from_bytes(data[pos + 22 : pos + 24], "little")
        elif cid == b"data":
            if rate is None or bits != 16 or channels != 1:
                raise RuntimeError(f"unexpected espeak-ng WAV format: {bits} bit, {channels} ch")
            body = data[pos + 8 :]
            body = body[: len(body) // 2 * 2]
            return np.frombuffer(body, "<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size + (size & 1)
    raise RuntimeError("no data chunk in espeak-ng WAV output")


def espeak_speech(
    phrases: list[str],
    voice: str,
    rate: int,
    pitch: int,
    pauses_ms: list[int],
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Speaks `phrases` with SSML breaks between them -> float32 [N] at `sample_rate`.

    voice: espeak-ng voice, e.g. "en-us+f3"; rate: words per minute; pitch: 0..99.
    """
    if not espeak_available():
        raise RuntimeError(
            "espeak-ng is not on PATH (apt-get install espeak-ng), or use the formant engine"
        )
    parts = []
    for i, phrase in enumerate(phrases):
        parts.append(phrase.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
        if i < len(phrases) - 1:
            parts.append(f'<break time="{int(pauses_ms[i])}ms"/>')
    ssml = "<speak>" + " ".join(parts) + "</speak>"
    cmd = ["espeak-ng", "-m", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", ssml]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({proc.returncode}): {proc.stderr.decode()[:500]}")
    audio, rate_in = _parse_wav(proc.stdout)
    return _resample(audio, rate_in, sample_rate)


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return x.astype(np.float32)
    import soxr  # librosa's resampler (a librosa dependency); cheap to import, unlike scipy

    return soxr.resample(x.astype(np.float32), rate_in, rate_out, quality="HQ")


# ----------------------------------------------------------------------------- formant


# Vowel formants (F1, F2, F3) in Hz for an adult male voice (Peterson & Barney style).
_VOWELS = {
    "a": (730, 1090, 2440),
    "e": (530, 1840, 2480),
    "i": (280, 2250, 2900),
    "o": (570, 840, 2410),
    "u": (310, 870, 2240),
    "ae": (660, 1720, 2410),
    "uh": (520, 1190, 2390),
    "er": (490, 1350, 1690),
}
# Consonant: (kind, noise band low/high Hz, duration s).
_CONSONANTS = {
    "p": ("stop", 500, 4000, 0.07),
    "t": ("stop", 2500, 6500, 0.07),
    "k": ("stop", 1500, 4000, 0.08),
    "b": ("stop", 300, 2500, 0.05),
    "d": ("stop", 1500, 5000, 0.05),
    "g": ("stop", 1000, 3500, 0.06),
    "s": ("fric", 4000, 7800, 0.11),
    "sh": ("fric", 2000, 5500, 0.11),
    "f": ("fric", 1500, 7000, 0.09),
    "h": ("fric", 500, 3000, 0.06),
    "m": ("nasal", 0, 0, 0.07),
    "n": ("nasal", 0, 0, 0.07),
    "l": ("liquid", 0, 0, 0.05),
    "r": ("liquid", 0, 0, 0.05),
}


def _resonate(x: np.ndarray, freqs: np.ndarray, bw: float, sr: int, block: int) -> np.ndarray:
    """Klatt resonator with a per-block centre frequency. x: [N]; freqs: [N // block + 1]."""
    import scipy.signal

    y = np.empty_like(x)
    zi = np.zeros(2)
    c = -np.exp(-2 * np.pi * bw / sr)
    for i in range(0, len(x), block):
        b = 2 * np.exp(-np.pi * bw / sr) * np.cos(2 * np.pi * freqs[i // block] / sr)
        a = 1.0 - b - c
        y[i : i + block], zi = scipy.signal.lfilter([a], [1.0, -b, -c], x[i : i + block], zi=zi)
    return y


def formant_speech(
    rng: np.random.Generator, seconds: float, f0: float, sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, str]:
    """Formant-synthesised babble: float32 [round(seconds * rate)] and its phone string."""
    import scipy.signal  # imported here: it costs ~1 s, and only this fallback needs it

    sr = sample_rate
    n = int(round(seconds * sr))
    scale = 1.0 + 0.17 * np.clip((f0 - 120.0) / 100.0, 0.0, 1.0)  # shorter vocal tract
    # Per-sample control tracks, filled syllable by syllable.
    formants = np.zeros((n, 3), np.float32)
    voiced = np.zeros(n, np.float32)
    noise_amp = np.zeros(n, np.float32)
    noise_band = np.zeros((n, 2), np.float32)
    phones, t = [], int(rng.uniform(0.05, 0.35) * sr)
    prev = np.array(_VOWELS["uh"], np.float32) * scale
    vowel_names = list(_VOWELS)
    cons_names = list(_CONSONANTS)
    while t < n:
        words = []
        for _ in range(int(rng.integers(2, 6))):  # words per phrase
            syllables = []
            for _ in range(int(rng.integers(1, 4))):  # syllables per word
                cname = cons_names[rng.integers(len(cons_names))] if rng.random() < 0.8 else ""
                vname = vowel_names[rng.integers(len(vowel_names))]
                target = np.array(_VOWELS[vname], np.float32) * scale
                if cname:
                    kind, lo, hi, dur = _CONSONANTS[cname]
                    m = int(dur * rng.uniform(0.8, 1.2) * sr)
                    seg = slice(t, min(t + m, n))
                    formants[seg] = prev
                    if kind == "stop":  # closure (silence) then a short burst
                        burst = slice(min(t + int(0.7 * m), n), min(t + m, n))
                        noise_amp[burst] = 0.5
                        noise_band[burst] = (lo, hi)
                    elif kind == "fric":
                        noise_amp[seg] = 0.35 if cname in ("s", "sh") else 0.18
                        noise_band[seg] = (lo, hi)
                    elif kind == "nasal":  # mouth closed, low murmur
                        voiced[seg] = 0.25
                        formants[seg] = (260 * scale, 1100 * scale, 2300 * scale)
                    else:
                        voiced[seg] = 0.6
                        formants[seg] = (360 * scale, 1300 * scale, 2500 * scale)
                    t += m
                m = int(rng.uniform(0.09, 0.24) * sr)
                seg = slice(min(t, n), min(t + m, n))
                # Formants glide from the previous target over the first 30 ms.
                k = np.clip(np.arange(seg.stop - seg.start) / (0.03 * sr), 0, 1)[:, None]
                formants[seg] = prev + k * (target - prev)
                env = np.sin(np.pi * np.clip(np.arange(seg.stop - seg.start) / max(m, 1), 0, 1))
                voiced[seg] = env**0.3 * rng.uniform(0.7, 1.0)  # fast onset, fast decay
                prev = target
                t += m
                syllables.append(cname + vname)
            words.append("".join(syllables))
            t += int(rng.uniform(0.0, 0.06) * sr)  # gap between words
        phones.append(" ".join(words))
        t += int(rng.uniform(0.15, 0.5) * sr)  # pause between phrases
    # Pitch: declination over each second, random accents, a little jitter.
    time = np.arange(n) / sr
    # Accents: random knots every ~250 ms, linearly interpolated.
    knots = rng.normal(0, 1, int(seconds * 4) + 2)
    accents = np.interp(np.arange(n), np.linspace(0, n - 1, len(knots)), knots)
    pitch = f0 * (1.0 + 0.12 * accents - 0.05 * (time % 1.5)) * (1 + 0.01 * rng.normal(size=n))
    phase = np.cumsum(pitch / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    # Glottal source (-12 dB/oct) plus lip radiation (+6 dB/oct): one pole, -6 dB/oct.
    src = scipy.signal.lfilter([1.0], [1.0, -0.96], pulses)
    block = 80
    grid = formants[::block]
    out = src * voiced
    for j, bw in enumerate((80.0, 100.0, 140.0)):
        out = _resonate(out, grid[:, j], bw, sr, block)
    # Noise: band-limited per segment (few distinct bands, so filter once per band).
    white = rng.normal(0, 1, n)
    noise = np.zeros(n)
    for lo, hi in sorted({tuple(b) for b in noise_band[noise_amp > 0].tolist()}):
        sos = scipy.signal.butter(2, [lo, min(hi, 0.45 * sr)], "bandpass", fs=sr, output="sos")
        mask = (noise_band[:, 0] == lo) & (noise_band[:, 1] == hi)
        noise += scipy.signal.sosfilt(sos, white) * mask
    out = out / (np.std(out) + 1e-9) + 0.8 * noise * noise_amp
    return out.astype(np.float32), " | ".join(phones)


# ----------------------------------------------------------------------------- clips


def fit_length(audio: np.ndarray, num_samples: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Cuts (with a 10 ms fade-out, no click) or zero-pads to exactly `num_samples`."""
    if len(audio) >= num_samples:
        out = audio[:num_samples].copy()
        fade = min(int(0.01 * sample_rate), num_samples)
        out[num_samples - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return out
    return np.pad(audio, (0, num_samples - len(audio))).astype(np.float32)


def normalize_level(audio: np.ndarray, fps: float = FPS, sample_rate: int = SAMPLE_RATE):
    """Scales so the 95th percentile of per-frame RMS is REFERENCE_RMS (peak kept < 1)."""
    spf = int(round(sample_rate / fps))
    t = len(audio) // spf
    rms = np.sqrt(np.mean(audio[: t * spf].reshape(t, spf) ** 2, axis=1))
    level = np.percentile(rms, 95) if t else 0.0
    if level < 1e-6:
        raise RuntimeError("synthesised speech is silent")
    out = audio * (REFERENCE_RMS / level)
    peak = np.max(np.abs(out))
    if peak > 0.99:  # rare: a very peaky voice; soft-limit rather than rescale the clip
        out = np.tanh(out / 0.99) * 0.99
    return out.astype(np.float32)


def synthesize_speech(
    rng: np.random.Generator,
    ident: Identity,
    seconds: float,
    engine: str = "auto",
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Exactly `seconds` of speech for `ident`: (float32 [round(seconds * rate)], attrs).

    The clip starts with 50-350 ms of silence; there is enough text to talk to the end.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = "espeak" if espeak_available() else "formant"
    n = int(round(seconds * sample_rate))
    if engine == "formant":
        audio, phones = formant_speech(
            rng, seconds, ident.f0 * rng.uniform(0.92, 1.08), sample_rate
        )
        attrs = {"tts": "formant", "text": phones, "voice": f"formant-f0-{ident.f0:.0f}"}
    else:
        rate = int(np.clip(ident.voice_rate + rng.integers(-15, 16), 110, 210))
        pitch = int(np.clip(ident.voice_pitch + rng.integers(-8, 9), 0, 99))
        # Words for ~1.5x the clip, so speech never runs out before the end.
        phrases = random_phrases(rng, ident.language, int(rate / 60.0 * seconds * 1.5) + 3)
        pauses = [int(p) for p in rng.integers(120, 550, size=len(phrases))]
        voice = f"{ident.language}+{ident.voice_variant}"
        speech = espeak_speech(phrases, voice, rate, pitch, pauses, sample_rate)
        lead = np.zeros(int(rng.uniform(0.05, 0.35) * sample_rate), np.float32)
        audio = np.concatenate([lead, speech])
        attrs = {
            "tts": "espeak-ng",
            "text": " / ".join(phrases),
            "voice": voice,
            "language": ident.language,
            "rate_wpm": rate,
            "pitch": pitch,
        }
    # The script is written long on purpose: the clip ends mid-text when this is True.
    attrs["text_cut"] = bool(len(audio) > n)
    audio = normalize_level(fit_length(audio, n, sample_rate), FPS, sample_rate)
    return audio, attrs
