"""The toy talking-head world, its datasets, and video/audio IO (DESIGN.md §9).

READ (arXiv 2508.03457) trains and evaluates on HDTF and MEAD; nothing here is the
paper's. This is our reconstruction of a world in which lip-sync is learnable on a CPU
and exactly measurable:

- speech: real eSpeak sentences through `praat-parselmouth` (optional extra) with exact
  phoneme times and a random voice, rate and pitch; or a numpy formant "babble" source
  that needs no extra package. Both give the same ground truth. A random loudness per
  phoneme keeps "the mouth follows the volume" from working: a linear probe on the
  spectrum reaches r 0.77 on held-out clips, on loudness alone 0.54 (`bench data`);
- mouth tracks: phoneme -> viseme targets (opening, spread) placed inside each phoneme,
  interpolated, smoothed (coarticulation) and averaged over each video frame. eSpeak
  leaves ~10 ms gaps between words; only gaps of >= 60 ms are silence;
- blinks and small head motion, independent of the audio;
- identities (skin, hair, background, clothes, face shape, eye and mouth geometry, lip
  colour) sampled from an integer seed, independent of the voice;
- a numpy renderer of anti-aliased ellipses at any square size, with cartoon proportions
  so the mouth reads at 32 px. The mouth interior has a reserved green (`MOUTH`) that no
  palette comes near (every palette colour has G - max(R, B) < 0.1, the interior 0.7),
  so `metrics.read_opening` reads the opening back from any frame.

Layout of a rendered set (data_toy/ is one): `manifest.json` (command, seeds, sentences,
voices, split, identity parameters) and per clip `CLIP.mp4` (H.264 yuv444p, no audio),
`CLIP.wav` (16 kHz mono PCM16) and `CLIP.npz` (per-frame labels).
`ToyClipDataset` reads it; `VideoFolderDataset` reads a folder of real mp4 (+ wav) clips
and yields the same sample format (labels NaN). `render_training_clips` renders more
training clips in memory (new faces and voices, the set's training sentences only), in
the format `ToyClipDataset` holds. The file runs: speech, identities,
renderer, clips and sets, datasets, then IO (`read_video`, `load_audio`, `load_image`,
`write_wav`, `VideoWriter`).
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.video.reformatter
import numpy as np
import torch
import torch.nn.functional as Fn

FPS = 25
SAMPLE_RATE = 16000
HOP = SAMPLE_RATE // FPS                      # 640 audio samples per video frame
MOUTH = (0.10, 0.80, 0.10)                    # reserved mouth-interior colour, RGB in [0, 1]
OPEN_GAIN = 0.28                              # interior half-height at opening 1, in face half-widths
SILENCE_GAP = 0.06                            # phoneme-tier gaps shorter than this are not silence
COARTICULATION_MS = 15                        # Gaussian smoothing of the mouth tracks
PHONE_JITTER_DB = 8.0                         # random loudness per phoneme (see _prosody)
LEAD, TAIL = (0.05, 0.2), (0.05, 0.2)         # silence before and after a sentence, s

# Short sentences, rich in bilabials (m, b, p) so lips-closed frames are frequent.
SENTENCES = [
    "My mother made a bamboo boat for Bob.", "Please pass me the maple syrup.",
    "Bring me my blue umbrella.", "Paul bought a big map of Bombay.",
    "The baby played with a purple ball.", "Mark put the paper in the box.",
    "Maybe Bill meant the moment before.", "Pam baked a plum pie.",
    "Many people prefer the beach in May.", "Bob's brother came home by bus.",
    "A small lamp stood by the bed.", "Peter picked a pepper from the pot.",
    "Mum put the milk back in the fridge.", "Both boys bumped into the bin.",
    "The map shows a path by the pond.", "My pen broke in the middle of the poem.",
    "Bees buzz above the empty meadow.", "Put the pumpkin by the pump.",
    "Molly promised to bring more bread.", "The prime minister began to speak.",
    "Bears climb up the maple tree.", "Pick up the map and move on.",
    "A bumpy ride made me sleepy.", "Ben opened the submarine hatch.",
    "Please bring back my pillow.", "The members met in the museum.",
    "Mabel bought seven warm buns.", "Pour the milk into the bowl.",
    "Bright lamps lit the empty room.", "My plan may be a problem.",
    "The puppy jumped over the mop.", "Bob mopped up the melted butter.",
    "Most people bump into me at the market.", "Palm trees sway by the bay.",
    "Emma made an apple crumble.", "The band played a mambo.",
    "Ambers burned in the pit.", "Bring the map up to the bishop.",
    "Pablo keeps his promise.", "The boat bobbed up and down.",
    "Maybe we can meet by the beam.", "The plumber fixed the pipe.",
    "Ms Brown embraced the baby.", "Pumas move by moonlight.",
    "Bubbles popped on the pavement.", "Please bump the number by one.",
    "Mix the bread crumbs with butter.", "The mob marched past the pub.",
    "A map must be simple.", "Bill bumped his lip on the pump.",
    "Put more pepper in the soup.", "My boss bought a moped.",
    "The moose moved by the marsh.", "Pink blossoms bloom in May.",
    "The bishop played the trumpet.", "Bobby mumbled a mild promise.",
    "Pat's pup plays by the pool.", "Members must pay by Monday.",
    "The camp is by the beach.", "Bake the pie a bit more.",
    "Mia met Ben at the bus stop.", "Pam's mum is from Bombay.",
    "The bumblebee buzzed by my ear.", "Big maps hang above the bed.",
    "Put the lamp beside the mirror.", "My puppy sleeps by the pipe.",
    "Bob's mop broke in the bucket.", "Bring some plums to the picnic.",
    "Pete's moped is parked by the pub.", "The baby's bib is embroidered.",
    "Mimi prepared a simple meal.", "Please play the piano for me.",
    "Ben and Pam went camping.", "My brother plays the bass.",
    "Maybe the bus comes by midnight.", "The puma pounced on the bamboo.",
    "Marble columns stood by the palace.", "Pip bumped into Bob.",
    "Mend the broken map with paper.", "Palmer promised a happy ending.",
]
LANGUAGES = ["English (Great Britain)", "English (America)", "English (Scotland)",
             "English (Received Pronunciation)", "English (Lancaster)",
             "English (West Midlands)", "English (Caribbean)"]
# eSpeak's natural-sounding variants; the novelty voices (Klatt, Jacky, ...) differ so much
# in timbre that a linear audio->mouth probe drops from r 0.80 to 0.75 with them.
VARIANTS = ["Male1", "Male2", "Male3", "Male4", "Male5", "Male6", "Male7", "Female1",
            "Female2", "Female3", "Female4", "Female5"]

# ----------------------------------------------------------------------------- speech

# Visemes: name, opening target in [0, 1], spread target in [-1, 1] (negative = rounded).
VISEMES = [("sil", 0.0, 0.0), ("mbp", 0.0, 0.0), ("fv", 0.08, 0.15), ("th", 0.15, 0.2),
           ("tdnl", 0.18, 0.25), ("sz", 0.1, 0.5), ("sh", 0.18, -0.45), ("kg", 0.22, 0.1),
           ("w", 0.08, -0.85), ("r", 0.15, -0.45), ("i", 0.2, 0.85), ("e", 0.55, 0.45),
           ("schwa", 0.4, 0.1), ("a", 1.0, 0.15), ("o", 0.75, -0.5), ("u", 0.25, -0.8)]
CLOSED = 1                                     # the viseme id of lips-closed sounds
_UNITS = {"tʃ": 6, "dʒ": 6}
_CHARS = {**{c: 1 for c in "mbp"}, **{c: 2 for c in "fv"}, **{c: 3 for c in "θð"},
          **{c: 4 for c in "tdnlɾɫ"}, **{c: 5 for c in "sz"}, **{c: 6 for c in "ʃʒ"},
          **{c: 7 for c in "kgŋhxʔɡç"}, **{c: 8 for c in "wʍ"}, **{c: 9 for c in "rɹɻ"},
          **{c: 10 for c in "iɪjyʏɨᵻ"}, **{c: 11 for c in "eɛæ"}, **{c: 12 for c in "əɜɚɘ"},
          **{c: 13 for c in "aɑɐʌ"}, **{c: 14 for c in "oɔɒ"}, **{c: 15 for c in "uʊɯ"}}


def phoneme_visemes(label):
    """Viseme ids of one phoneme label ('aɪ' -> [a, i]); stress and length marks ignored."""
    out, i = [], 0
    while i < len(label):
        if label[i:i + 2] in _UNITS:
            out.append(_UNITS[label[i:i + 2]]); i += 2; continue
        if label[i] in _CHARS:
            out.append(_CHARS[label[i]])
        i += 1
    return out or [12]


@dataclass
class Voice:
    language: str = "English (Great Britain)"
    variant: str = "Male1"
    rate: int = 175            # words per minute
    pitch: float = 1.0         # pitch multiplier
    gain: float = 0.6          # peak amplitude of the waveform


def sample_voice(seed):
    """A random eSpeak voice, independent of any identity."""
    rng = np.random.default_rng([seed, 11])
    return Voice(LANGUAGES[rng.integers(len(LANGUAGES))], VARIANTS[rng.integers(len(VARIANTS))],
                 int(rng.integers(140, 201)), round(float(rng.uniform(0.75, 1.35)), 3),
                 round(float(rng.uniform(0.35, 0.8)), 3))



def require_espeak(what, otherwise):
    """Fail early, with the fix, where eSpeak speech is needed and praat-parselmouth is missing."""
    try:
        import parselmouth  # noqa: F401
    except ImportError:
        raise ImportError(f"{what} needs praat-parselmouth: `pip install -e \".[speech]\"`, "
                          f"or {otherwise}") from None


def speak(text, voice):
    """eSpeak via praat-parselmouth -> (audio (S,) float32 16 kHz, phones [(label, t0, t1)]).

    eSpeak keeps internal state between sentences (the same sentence twice in one process
    differs by a few samples), so each sentence is synthesised in a forked child of a
    process that never synthesises itself: every call starts from the same state and the
    same sentence and voice always give the same samples.
    """
    require_espeak("eSpeak speech", "use source='babble'")
    if not hasattr(os, "fork"):                       # no fork (Windows): not bit-reproducible
        return _speak_here(text, voice)
    import pickle
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # child: synthesise, send, exit at once
        try:
            payload = pickle.dumps(_speak_here(text, voice))
        except BaseException as e:                   # noqa: BLE001 (re-raised in the parent)
            payload = pickle.dumps(RuntimeError(f"eSpeak failed on {text!r}: {e}"))
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = pickle.loads(f.read())
    os.waitpid(pid, 0)
    if isinstance(out, BaseException):
        raise out
    return out


def _speak_here(text, voice):
    from parselmouth.praat import call
    synth = call("Create SpeechSynthesizer", voice.language, voice.variant)
    call(synth, "Speech output settings", SAMPLE_RATE, 0.01, voice.pitch, 1.0, voice.rate, "IPA")
    grid, sound = call(synth, "To Sound", text, "yes")
    audio = sound.values[0].astype(np.float32)
    tier = 4                                   # sentence, clause, word, phoneme
    phones = [(call(grid, "Get label of interval", tier, j),
               call(grid, "Get start time of interval", tier, j),
               call(grid, "Get end time of interval", tier, j))
              for j in range(1, call(grid, "Get number of intervals", tier) + 1)]
    return audio, phones


# babble: formant targets (F1, F2, F3 in Hz) per viseme, and which visemes are voiced/noisy
_FORMANTS = {10: (300, 2300, 3000), 11: (530, 1850, 2500), 12: (500, 1500, 2500),
             13: (750, 1250, 2500), 14: (570, 850, 2400), 15: (320, 900, 2300),
             1: (250, 900, 2200), 4: (300, 1700, 2600), 9: (350, 1100, 1700),
             8: (300, 700, 2200), 7: (350, 1900, 2500)}
_NOISY = {2: (4000, 1500), 3: (5000, 2000), 5: (6000, 1500), 6: (3000, 1000)}


def babble(seed, duration=2.5, pitch=1.0, audio=True):
    """Numpy formant babble: random CV syllables -> (audio, phones); no extra packages.
    With audio=False the phones come with silence of the same length (4x faster).

    Voiced sounds are a harmonic source shaped by formant resonances (F1 rises with the
    mouth opening, as in speech); fricatives are band-passed noise; closures are a weak
    murmur. Phone labels use the same IPA characters as eSpeak, so tracks are shared.
    """
    rng = np.random.default_rng([seed, 12])
    vowels, consonants = "aeiouəɔɪ", ["m", "b", "p", "f", "s", "ʃ", "t", "l", "k", "w", "ɹ", "n"]
    phones, t = [], 0.0
    while t < duration:
        if rng.random() < 0.15:                               # pause
            d = rng.uniform(0.08, 0.25); phones.append(("", t, t + d)); t += d
        c = consonants[rng.integers(len(consonants))]; d = rng.uniform(0.05, 0.11)
        phones.append((c, t, t + d)); t += d
        v = vowels[rng.integers(len(vowels))]; d = rng.uniform(0.09, 0.22)
        phones.append((v, t, t + d)); t += d
    S = int(round(t * SAMPLE_RATE))
    if not audio:
        return np.zeros(S, np.float32), phones
    ts = np.arange(S) / SAMPLE_RATE
    f1, f2, f3, voiced, noisy, fc, bw = (np.zeros(S) for _ in range(7))
    for label, t0, t1 in phones:
        s = slice(int(round(t0 * SAMPLE_RATE)), int(round(t1 * SAMPLE_RATE)))
        v = phoneme_visemes(label)[0] if label else 0
        if v in _FORMANTS:
            f1[s], f2[s], f3[s] = _FORMANTS[v]; voiced[s] = 0.15 if v == 1 else 1.0
        if v in _NOISY:
            fc[s], bw[s] = _NOISY[v]; noisy[s] = 0.35
    k = int(0.015 * SAMPLE_RATE)                              # smooth formant transitions
    win = np.hanning(2 * k + 1); win /= win.sum()
    f1, f2, f3, voiced, noisy = (np.convolve(x, win, mode="same") for x in (f1, f2, f3, voiced, noisy))
    f0 = pitch * rng.uniform(95, 200) * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * ts + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    wave = np.zeros(S)
    for h in range(1, 40):                                    # harmonics through formant peaks
        fh = h * f0
        amp = sum(1.0 / (1 + ((fh - fk) / (60 + 0.1 * fk)) ** 2) for fk in (f1, f2, f3))
        wave += np.where(fh < 7000, amp / h ** 0.7, 0.0) * np.sin(h * phase)
    wave *= voiced
    noise = rng.standard_normal(S)
    spec = np.fft.rfft(noise); freqs = np.fft.rfftfreq(S, 1 / SAMPLE_RATE)
    hiss = np.fft.irfft(spec * (freqs > 2500), n=S)           # one broad fricative band
    wave += 3.0 * noisy * hiss
    wave = wave / (np.abs(wave).max() + 1e-8)
    return wave.astype(np.float32), phones


def mouth_tracks(phones, n_frames, offset=0.0, fps=FPS):
    """Phones (label, t0, t1) shifted by `offset` s -> per-frame opening, spread, viseme, closed.

    Each phoneme's visemes get targets spread evenly inside it (a closure holds its
    target over the middle half so the lips really meet); a linear track on a 1 ms grid
    is smoothed by a 15 ms Gaussian (coarticulation) and averaged over each frame.
    """
    keys_t, keys_o, keys_s = [0.0], [0.0], [0.0]
    spans = []                                    # (t0, t1, viseme) for frame labels
    for label, t0, t1 in phones:
        t0, t1 = t0 + offset, t1 + offset
        if not label:
            if t1 - t0 >= SILENCE_GAP:
                keys_t += [t0 + 0.03, t1 - 0.03]; keys_o += [0, 0]; keys_s += [0, 0]
                spans.append((t0, t1, 0))
            continue
        vis = phoneme_visemes(label)
        d = (t1 - t0) / len(vis)
        for k, v in enumerate(vis):
            a, b = t0 + k * d, t0 + (k + 1) * d
            spans.append((a, b, v))
            pts = [a + 0.25 * d, a + 0.75 * d] if v == CLOSED else [a + 0.5 * d]
            keys_t += pts; keys_o += [VISEMES[v][1]] * len(pts); keys_s += [VISEMES[v][2]] * len(pts)
    end = n_frames / fps
    keys_t.append(end); keys_o.append(0.0); keys_s.append(0.0)
    order = np.argsort(keys_t, kind="stable")
    kt = np.asarray(keys_t)[order]
    grid = (np.arange(n_frames * 40) + 0.5) / 1000.0                 # 1 ms grid, 40 per frame
    sig = COARTICULATION_MS
    g = np.exp(-0.5 * (np.arange(-3 * sig, 3 * sig + 1) / sig) ** 2); g /= g.sum()
    tracks = []
    for kv in (keys_o, keys_s):
        x = np.interp(grid, kt, np.asarray(kv, dtype=np.float64)[order])
        x = np.convolve(np.pad(x, 3 * sig, mode="edge"), g, mode="valid")
        tracks.append(x.reshape(n_frames, 40).mean(1).astype(np.float32))
    opening, spread = np.clip(tracks[0], 0, 1), np.clip(tracks[1], -1, 1)
    centres = (np.arange(n_frames) + 0.5) / fps
    viseme = np.zeros(n_frames, dtype=np.int64)
    if spans:
        starts = np.array([s[0] for s in spans]); ends = np.array([s[1] for s in spans])
        for i, c in enumerate(centres):
            inside = np.nonzero((starts <= c) & (c < ends))[0]
            if len(inside):
                viseme[i] = spans[inside[0]][2]
            elif starts[0] <= c <= ends[-1]:                          # a short inter-word gap
                viseme[i] = spans[int(np.argmin(np.minimum(abs(starts - c), abs(ends - c))))][2]
    # closed: the frame centre lies in the held middle of a lips-closed sound (its edges are
    # transitions, averaged into the frame), so the truth's own opening there is near 0
    closed = np.zeros(n_frames, dtype=bool)
    for a, b, v in spans:
        if v == CLOSED:
            closed |= (centres >= a + 0.15 * (b - a)) & (centres <= b - 0.15 * (b - a))
    return dict(opening=opening, spread=spread, viseme=viseme, closed=closed)


def blinks_and_head(seed, n_frames, fps=FPS):
    """Blink (T,) in [0, 1] and head offset (T, 2) in frame units, independent of audio."""
    rng = np.random.default_rng([seed, 13])
    t = np.arange(n_frames) / fps
    blink = np.zeros(n_frames, dtype=np.float32)
    tb = rng.uniform(-1.0, 1.5)
    while tb < t[-1] + 1:
        half = rng.uniform(0.07, 0.12)
        blink = np.maximum(blink, np.clip(1 - np.abs(t - tb) / half, 0, 1))
        tb += rng.uniform(1.5, 4.5)
    head = np.zeros((n_frames, 2))
    for axis, amp in ((0, 0.025), (1, 0.012)):
        for _ in range(3):
            head[:, axis] += amp / 3 * rng.uniform(0.5, 1.5) * np.sin(
                2 * np.pi * rng.uniform(0.1, 0.6) * t + rng.uniform(0, 2 * np.pi))
    return blink.astype(np.float32), head.astype(np.float32)


# ----------------------------------------------------------------------------- identities

def _green(c):
    """How green-dominant a colour is; the reserved mouth colour scores 0.7."""
    return c[1] - max(c[0], c[2])


@dataclass
class Identity:
    seed: int = 0
    skin: tuple = (0.85, 0.65, 0.5)
    hair: tuple = (0.2, 0.12, 0.08)
    background: tuple = (0.4, 0.5, 0.7)
    clothes: tuple = (0.6, 0.2, 0.2)
    lips: tuple = (0.7, 0.3, 0.3)
    iris: tuple = (0.25, 0.15, 0.1)
    face_rx: float = 0.3       # face half-width, in frame units
    face_ry: float = 0.38      # face half-height
    face_cy: float = 0.52      # face centre height
    hair_drop: float = 0.35    # how far the hair cap comes down, in face half-heights
    long_hair: bool = False
    eye_y: float = -0.09       # relative to the face centre
    eye_dx: float = 0.11
    eye_r: float = 0.045
    mouth_y: float = 0.15
    mouth_w: float = 0.11      # mouth half-width at rest
    lip: float = 0.016         # lip thickness


_SKINS = np.array([(0.98, 0.84, 0.72), (0.93, 0.74, 0.6), (0.8, 0.6, 0.45),
                   (0.62, 0.43, 0.3), (0.42, 0.28, 0.2), (0.3, 0.2, 0.15)])
_HAIRS = np.array([(0.08, 0.06, 0.05), (0.25, 0.15, 0.08), (0.45, 0.3, 0.15), (0.6, 0.25, 0.1),
                   (0.9, 0.78, 0.45), (0.7, 0.7, 0.72), (0.3, 0.3, 0.75), (0.75, 0.3, 0.6)])


def _far(c, others, d=0.25):
    return all(np.abs(np.subtract(c, o)).sum() > d for o in others)


def sample_identity(seed):
    """A random face from an integer seed (independent of voice); palettes avoid MOUTH."""
    rng = np.random.default_rng([seed, 10])
    a = rng.uniform(0, len(_SKINS) - 1)
    skin = _SKINS[int(a)] + (a - int(a)) * (_SKINS[min(int(a) + 1, len(_SKINS) - 1)] - _SKINS[int(a)])
    skin = np.clip(skin + rng.uniform(-0.03, 0.03, 3), 0, 1)
    pick = lambda: tuple(float(x) for x in np.round(np.clip(
        _HAIRS[rng.integers(len(_HAIRS))] + rng.uniform(-0.06, 0.06, 3), 0, 1), 3))
    hair = pick()
    while not _far(hair, [skin]):
        hair = pick()
    def colour(avoid):
        while True:
            c = tuple(float(x) for x in np.round(rng.uniform(0.05, 0.95, 3), 3))
            if _green(c) < 0.08 and _far(c, avoid, 0.45):
                return c
    background = colour([skin, hair])
    clothes = colour([skin, background])
    lips = np.clip(skin * rng.uniform(0.6, 0.8) + np.array([0.25, 0.0, 0.02]) * rng.uniform(0.3, 1), 0, 1)
    iris = [(0.25, 0.15, 0.08), (0.15, 0.25, 0.45), (0.3, 0.32, 0.22), (0.08, 0.06, 0.05)][rng.integers(4)]
    r3 = lambda x: tuple(float(v) for v in np.round(x, 3))
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 4)
    return Identity(seed=int(seed), skin=r3(skin), hair=hair, background=background,
                    clothes=clothes, lips=r3(lips), iris=iris, face_rx=u(0.26, 0.33),
                    face_ry=u(0.33, 0.4), face_cy=u(0.5, 0.55), hair_drop=u(0.2, 0.5),
                    long_hair=bool(rng.random() < 0.4), eye_y=u(-0.12, -0.06),
                    eye_dx=u(0.09, 0.13), eye_r=u(0.035, 0.055), mouth_y=u(0.13, 0.17),
                    mouth_w=u(0.08, 0.12), lip=u(0.012, 0.02))


# ----------------------------------------------------------------------------- renderer

def _ellipse(X, Y, cx, cy, rx, ry, size):
    """Anti-aliased coverage of ellipses, one per frame: cx, cy, rx, ry (T, 1, 1) -> (T, H, W).

    The signed distance is approximated by F / |grad F| with F = (x/rx)^2 + (y/ry)^2 - 1,
    exact enough within a pixel of the edge, which is all anti-aliasing needs.
    """
    dx, dy = X - cx, Y - cy
    rx, ry = np.maximum(rx, 1e-4), np.maximum(ry, 1e-4)
    F = (dx / rx) ** 2 + (dy / ry) ** 2 - 1
    grad = 2 * np.sqrt((dx / rx ** 2) ** 2 + (dy / ry ** 2) ** 2) + 1e-6
    thin = np.minimum(1, 2 * np.minimum(rx, ry) * size)               # a sliver covers little
    return np.clip(0.5 - F / grad * size, 0, 1) * thin


def render_frames(identity, opening, spread, blink, head, size=64):
    """Draw a face: tracks (T,), head (T, 2) -> uint8 frames (T, H, W, 3) with H = W = size."""
    p, T = identity, len(opening)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    X, Y = c[None, None, :], c[:, None][None]                         # (1, 1, W), (1, H, 1)
    col = lambda v: v[:, None, None].astype(np.float32)               # (T,) -> (T, 1, 1)
    one = np.ones(T, dtype=np.float32)
    img = np.broadcast_to(np.asarray(p.background, np.float32), (T, size, size, 3)).copy()

    def paint(cov, colour):
        img[:] += cov[..., None] * (np.asarray(colour, np.float32) - img)

    hx, hy = col(0.5 + head[:, 0]), col(p.face_cy + head[:, 1])       # face centre per frame
    rx, ry = p.face_rx, p.face_ry
    paint(_ellipse(X, Y, col(0.5 * one), col(1.12 * one), col(0.42 * one), col(0.25 * one), size), p.clothes)
    paint(_ellipse(X, Y, hx * 0 + 0.5, col((p.face_cy + ry * 0.9) * one), col(0.35 * rx * one),
                   col(0.3 * one), size), np.asarray(p.skin) * 0.85)   # neck
    if p.long_hair:
        paint(_ellipse(X, Y, hx, hy + 0.25 * ry, col(1.18 * rx * one), col(1.2 * ry * one), size), p.hair)
    paint(_ellipse(X, Y, hx, hy, col(rx * one), col(ry * one), size), p.skin)
    cap = _ellipse(X, Y, hx, hy - 0.06 * ry, col(1.06 * rx * one), col(1.02 * ry * one), size)
    line = np.clip((hy - ry + 2 * p.hair_drop * ry * 0.5 - Y) * size + 0.5, 0, 1)  # above hairline
    paint(cap * line, p.hair)
    for side in (-1, 1):
        ex, ey = hx + side * p.eye_dx, hy + p.eye_y
        lid = col(np.clip(1 - 0.92 * blink, 0.04, 1))
        paint(_ellipse(X, Y, ex, ey - 1.6 * p.eye_r, col(1.2 * p.eye_r * one), col(0.25 * p.eye_r * one), size), p.hair)
        paint(_ellipse(X, Y, ex, ey, col(p.eye_r * one), p.eye_r * 0.8 * lid, size), (0.97, 0.97, 0.95))
        paint(_ellipse(X, Y, ex, ey, col(0.55 * p.eye_r * one), 0.55 * p.eye_r * lid, size), p.iris)
    paint(_ellipse(X, Y, hx, hy + 0.04, col(0.025 * one), col(0.035 * one), size), np.asarray(p.skin) * 0.8)
    mx, my = hx, hy + p.mouth_y
    half_w = col(p.mouth_w * (1 + 0.22 * spread))
    half_h = col(OPEN_GAIN * rx * opening)
    paint(_ellipse(X, Y, mx, my, half_w + 0.01, half_h + p.lip, size), p.lips)
    paint(_ellipse(X, Y, mx, my, 0.85 * half_w, half_h, size), MOUTH)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- clips

def render_clip(identity, text=None, size=64, seed=0, source="espeak", voice=None, frames=True, audio=True):
    """One sentence spoken by one face -> dict of frames, audio and per-frame truth.

    identity: an `Identity` (or an int seed for one); text: the sentence (eSpeak) or
    None (babble); seed: voice, padding, blinks and head motion. Returns `video` uint8
    (T, H, W, 3), `audio` float32 (T*640,) and tracks `opening`, `spread`, `viseme`,
    `closed`, `blink` (T,), `head` (T, 2), plus `phones` (label, t0, t1) in seconds of
    speech (add `offset` for seconds of the clip), `voice`, `text`. With frames=False
    `video` is None (speech and truth only, several times faster); with audio=False and
    babble, `audio` is None (frames and truth only, the same frames, 4x faster).
    """
    if not isinstance(identity, Identity):
        identity = sample_identity(int(identity))
    if source not in ("espeak", "babble"):
        raise ValueError(f"source must be 'espeak' or 'babble', got {source!r}")
    voice = voice or sample_voice(seed)
    rng = np.random.default_rng([seed, 14])
    if source == "espeak":
        if not text:
            raise ValueError("source='espeak' needs a sentence in `text`")
        speech, phones = speak(text, voice)
    else:
        speech, phones = babble(seed, duration=float(rng.uniform(1.8, 3.2)), pitch=voice.pitch, audio=audio)
    while phones and not phones[-1][0]:                                   # eSpeak's trailing silence
        phones = phones[:-1]
    if not phones:
        raise ValueError(f"no phonemes in {text!r}; give a sentence with words")
    speech = speech[:int((phones[-1][2] + 0.05) * SAMPLE_RATE)]
    speech = speech * _prosody(rng, len(speech), phones) / (np.abs(speech).max() + 1e-8)
    lead = int(rng.uniform(*LEAD) * SAMPLE_RATE)
    tail = int(rng.uniform(*TAIL) * SAMPLE_RATE)
    T = math.ceil((lead + len(speech) + tail) / HOP)
    wave = None
    if audio:
        wave = (3e-4 * rng.standard_normal(T * HOP)).astype(np.float32)   # a quiet noise floor
        wave[lead:lead + len(speech)] += voice.gain * speech / (np.abs(speech).max() + 1e-8)
    tracks = mouth_tracks(phones, T, offset=lead / SAMPLE_RATE)
    blink, head = blinks_and_head(seed, T)
    video = render_frames(identity, tracks["opening"], tracks["spread"], blink, head, size) if frames else None
    return dict(video=video, audio=wave, blink=blink, head=head, **tracks, phones=phones,
                offset=lead / SAMPLE_RATE, voice=asdict(voice), text=text or "",
                identity=asdict(identity))


def _prosody(rng, n, phones, jitter_db=PHONE_JITTER_DB):
    """A random loudness contour: a slow one (about +-6 dB, 0.5-3 Hz, as stress and emphasis
    give) times an independent gain per phoneme (+-jitter_db), smoothed over 20 ms. Open
    vowels are louder than consonants in any voice; the jitter keeps loudness alone from
    predicting the mouth well, while the spectrum still does."""
    t = np.arange(n) / SAMPLE_RATE
    db = sum(rng.uniform(2, 4) * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t + rng.uniform(0, 2 * np.pi))
             for _ in range(3))
    steps = np.zeros(n)
    for _, t0, t1 in phones:
        steps[int(t0 * SAMPLE_RATE):int(t1 * SAMPLE_RATE)] = rng.uniform(-jitter_db, jitter_db)
    k = int(0.02 * SAMPLE_RATE)
    steps = np.convolve(steps, np.ones(k) / k, mode="same")
    return 10 ** ((db + steps) / 20)


def _split_sentences(seed, test_fraction):
    order = np.random.default_rng([seed, 15]).permutation(len(SENTENCES))
    n_test = max(1, int(round(test_fraction * len(SENTENCES))))
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


def render_dataset(out, train_identities=20, test_identities=5, clips_per_identity=5, size=64,
                   seed=0, source="espeak", test_clips=None, test_fraction=0.25, crf=12, command="",
                   progress=True):
    """Render a toy set into `out` (layout in the module docstring); returns the manifest.

    Train and test are disjoint in identities and in sentences. Identity i of the set
    has seed `seed * 100_000 + i`; clip k of it has seed `(seed * 100_000 + i) * 100 + k`.
    Same arguments -> same bytes.
    """
    from tqdm import tqdm
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sentences = dict(zip(("train", "test"), _split_sentences(seed, test_fraction)))
    identities, clips, jobs = [], [], []
    for i in range(train_identities + test_identities):
        split = "train" if i < train_identities else "test"
        ident = sample_identity(seed * 100_000 + i)
        identities.append(dict(id=i, split=split, params=asdict(ident)))
        pool = sentences[split]
        picks = np.random.default_rng([seed, i, 16]).permutation(pool)
        n_clips = clips_per_identity if split == "train" or test_clips is None else test_clips
        for k in range(n_clips):
            jobs.append((split, i, ident, int(picks[k % len(pool)]), (seed * 100_000 + i) * 100 + k))
    for split, i, ident, s, clip_seed in tqdm(jobs, desc=f"render {out}", disable=not progress):
        text = SENTENCES[s] if source == "espeak" else None
        clip = render_clip(ident, text, size=size, seed=clip_seed, source=source)
        name = f"{split}/id{i:03d}_c{clip_seed % 100:02d}"
        write_clip(out / name, clip, crf)
        clips.append(dict(name=name, split=split, identity=i, sentence=s if text else None,
                          text=clip["text"], seed=clip_seed, frames=len(clip["video"]),
                          voice=clip["voice"]))
    manifest = dict(format=1, command=command, fps=FPS, sample_rate=SAMPLE_RATE, size=size,
                    seed=seed, source=source, crf=crf, visemes=[v[0] for v in VISEMES],
                    sentences={k: [[j, SENTENCES[j]] for j in v] for k, v in sentences.items()},
                    identities=identities, clips=clips)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


EXTRA_FIRST = 5000                  # first identity index of extra training clips (past any toy set's)


def train_words(seed=0, test_fraction=0.25):
    """The words of a toy set's training sentences (none only a held-out sentence has)."""
    train, _ = _split_sentences(seed, test_fraction)
    return sorted({w.strip(".,'").lower() for s in train for w in SENTENCES[s].split()} - {""})


def _salad(rng, words, lo=4, hi=9):
    """A random word sequence: new phoneme sequences from known words."""
    text = " ".join(words[i] for i in rng.integers(len(words), size=int(rng.integers(lo, hi))))
    return text[0].upper() + text[1:] + "."


def _render_extra(job):
    _, ident_seed, clip_seed, text, size, _, frames = job
    # numpy only: safe in a forked worker
    return render_clip(ident_seed, text, size=size, seed=clip_seed, frames=frames)


def _as_toy_clip(job, c):
    """A rendered clip -> the dict ToyClipDataset holds (torch work stays in the parent process)."""
    i, ident_seed, clip_seed, text, _, out_size, frames = job
    return dict(name=f"extra/id{i:04d}_c{clip_seed % 100:02d}", identity=ident_seed, text=text,
                video=to_tensor(c["video"], out_size) if frames else None, audio=torch.from_numpy(c["audio"]),
                **label_tensors(c))


def render_training_clips(identities, clips_per_identity=4, out_size=32, size=64, seed=0,
                          first=EXTRA_FIRST, salad=0.5, test_fraction=0.25, workers=1, progress=False, frames=True):
    """Extra eSpeak training clips rendered in memory, as ToyClipDataset's `clips` dicts.

    New faces (identities first.. of `seed`, past any rendered set's) and new voices, each
    clip speaking either one of the set's training sentences or, with probability `salad`,
    a random sequence of their words: held-out sentences and faces stay unseen. Frames are
    rendered at `size` and reduced to `out_size` exactly as ToyClipDataset reads data_toy.
    Same arguments -> same clips (frames=False: the same speech and truth, `video` None).
    Needs praat-parselmouth (`pip install -e .[speech]`).
    """
    from tqdm import tqdm
    require_espeak("rendering extra eSpeak training clips", "train with extra_clips=0")
    sentences, words = _split_sentences(seed, test_fraction)[0], train_words(seed, test_fraction)
    jobs = []
    for i in range(first, first + identities):
        ident_seed = seed * 100_000 + i
        for k in range(clips_per_identity):
            clip_seed = ident_seed * 100 + k
            rng = np.random.default_rng([clip_seed, 17])
            text = _salad(rng, words) if rng.random() < salad else SENTENCES[sentences[rng.integers(len(sentences))]]
            jobs.append((i, ident_seed, clip_seed, text, size, out_size, frames))
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            rendered = pool.imap(_render_extra, jobs, chunksize=4)
            return [_as_toy_clip(j, c) for j, c in zip(jobs, tqdm(rendered, total=len(jobs), desc="render extra clips",
                                                                  disable=not progress))]
    return [_as_toy_clip(j, _render_extra(j)) for j in tqdm(jobs, desc="render extra clips", disable=not progress)]


def write_clip(stem, clip, crf=12):
    """One rendered clip -> stem.mp4 (yuv444p keeps the reserved colour), stem.wav, stem.npz."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(stem.with_suffix(".mp4"), crf=crf, pix_fmt="yuv444p") as w:
        w.write(clip["video"])
    write_wav(stem.with_suffix(".wav"), clip["audio"])
    _save_npz(stem.with_suffix(".npz"), {k: clip[k] for k in ("opening", "spread", "viseme",
                                                            "closed", "blink", "head")})


def _save_npz(path, arrays):
    """np.savez with fixed zip timestamps, so the same arrays give the same bytes."""
    import zipfile
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in arrays.items():
            info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w") as f:
                np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- datasets

def to_tensor(frames, size):
    """uint8 frames (T, H, W, 3) -> float32 (3, T, size, size) in [-1, 1] (centre crop + resize)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    H, W = x.shape[-2:]
    if H != W:
        s = min(H, W)
        x = x[..., (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    T, _, S, _ = x.shape
    if S != size and S % size == 0:                                  # exact box filter
        f = S // size
        x = x.reshape(T, 3, size, f, size, f).mean(dim=(3, 5))       # (T, 3, size, size)
    elif S != size:
        x = Fn.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def label_tensors(labels):
    """Per-frame truth (a rendered clip's arrays or a saved .npz) as the tensors datasets hold:
    opening, spread, blink (T,) and head (T, 2) float32, viseme (T,) int64, closed (T,) bool."""
    out = {k: torch.from_numpy(np.asarray(labels[k], dtype=np.float32))
           for k in ("opening", "spread", "blink", "head")}
    out["viseme"] = torch.from_numpy(np.asarray(labels["viseme"], dtype=np.int64))
    out["closed"] = torch.from_numpy(np.asarray(labels["closed"], dtype=bool))
    return out


class _Windows(torch.utils.data.Dataset):
    """Cuts T-frame windows out of in-memory clips; the reference comes from elsewhere.

    Item i is clip `self.index[i]`; its start frame and reference frame are drawn from
    a generator seeded by (seed, epoch, i): deterministic per index, new per epoch.
    """

    def _setup(self, clips, frames, seed):
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames, self.seed, self.epoch = frames, seed, 0
        self.clips = [c for c in clips if c["video"].shape[1] >= frames]
        if not self.clips:
            longest = max((c["video"].shape[1] for c in clips), default=0)
            raise ValueError(f"no clip has {frames} frames (longest: {longest}); use fewer frames")
        self.index = [j for j, c in enumerate(self.clips) for _ in range(max(1, c["video"].shape[1] // frames))]
        self.by_identity = {}
        for j, c in enumerate(self.clips):
            self.by_identity.setdefault(c["identity"], []).append(j)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        T, j = self.frames, self.index[i]
        c = self.clips[j]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        n = c["video"].shape[1]
        t0 = int(rng.integers(0, n - T + 1))
        others = [k for k in self.by_identity[c["identity"]] if k != j]
        if others:
            ref_clip = self.clips[others[rng.integers(len(others))]]
            ref = ref_clip["video"][:, rng.integers(ref_clip["video"].shape[1])]
        else:                                   # one clip only: the frame farthest from the window
            far = 0 if t0 + T / 2 > n / 2 else n - 1
            ref = c["video"][:, far]
        item = dict(video=c["video"][:, t0:t0 + T], audio=c["audio"][t0 * HOP:(t0 + T) * HOP],
                    reference=ref, identity=c["identity"], clip=c["name"])
        for k in ("opening", "spread", "viseme", "blink", "head", "closed"):
            item[k] = c[k][t0:t0 + T]
        return item


class ToyClipDataset(_Windows):
    """Windows of T frames from a rendered toy set (data_toy/), decoded once, held in memory.

    Items: `video` (3, T, H, W) in [-1, 1], `audio` (T*640,), `reference` (3, H, W) from
    another clip of the same identity, tracks `opening` `spread` `blink` (T,), `viseme`
    (T,) int64, `head` (T, 2), `closed` (T,) bool, `identity` int, `clip` str.
    """

    def __init__(self, root="data_toy", split="train", size=32, frames=33, seed=0):
        root = Path(root)
        if not (root / "manifest.json").exists():
            raise FileNotFoundError(f"{root}/manifest.json not found; render a set with "
                                    "`python -m minread render-data --out {root}`")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.manifest = json.loads((root / "manifest.json").read_text())
        clips = []
        for m in self.manifest["clips"]:
            if m["split"] != split:
                continue
            labels = np.load(root / f"{m['name']}.npz")
            clips.append(dict(name=m["name"], identity=m["identity"],
                              video=to_tensor(read_video(root / f"{m['name']}.mp4"), size),
                              audio=torch.from_numpy(load_audio(root / f"{m['name']}.wav")),
                              **label_tensors(labels)))
        self._setup(clips, frames, seed)


class VideoFolderDataset(_Windows):
    """Windows from a folder of real clips: `*.mp4` (faces cropped) + optional sibling `.wav`.

    Video is resampled to 25 fps and resized to `size`; audio (the wav, else the mp4's
    own track) to 16 kHz mono. The identity is the clip's sub-folder (or its file stem
    at the top level). Same items as `ToyClipDataset`; tracks are NaN (viseme -1).
    """

    def __init__(self, root, size=32, frames=33, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of .mp4 clips")
        paths = sorted(root.rglob("*.mp4"))
        if not paths:
            raise FileNotFoundError(f"no .mp4 files under {root}")
        names = sorted({str(p.parent.relative_to(root)) if p.parent != root else p.stem for p in paths})
        clips = []
        for p in paths:
            video = to_tensor(read_video(p, fps=FPS), size)
            wav = p.with_suffix(".wav")
            audio = load_audio(wav if wav.exists() else p)
            T = min(video.shape[1], len(audio) // HOP)
            if T < 1:
                raise ValueError(f"{p}: audio ({len(audio)} samples) shorter than one frame")
            audio = np.pad(audio, (0, max(0, T * HOP - len(audio))))[:T * HOP]
            nan = torch.full((T,), float("nan"))
            key = str(p.parent.relative_to(root)) if p.parent != root else p.stem
            clips.append(dict(name=str(p.relative_to(root)), identity=names.index(key),
                              video=video[:, :T], audio=torch.from_numpy(audio), opening=nan,
                              spread=nan, blink=nan, head=torch.full((T, 2), float("nan")),
                              viseme=torch.full((T,), -1, dtype=torch.int64),
                              closed=torch.zeros(T, dtype=torch.bool)))
        self._setup(clips, frames, seed)


# ----------------------------------------------------------------------------- IO

def save_checkpoint(path, obj):
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only: tensors and plain containers, no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: train one with "
                                f"`python -m minread train` or pass --ckpt with a valid path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable minread checkpoint ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]}); delete it or retrain") from None


def _open(path, what):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty; expected a {what} file")
    try:
        return av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"cannot read {path} as a {what} file ({e}); is it corrupt?") from e


def read_video(path, fps=None):
    """Decode all frames -> uint8 (T, H, W, 3); with `fps`, resample by nearest earlier frame."""
    with _open(path, "video") as box:
        if not box.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = box.streams.video[0]
        stream.thread_type = "NONE"
        frames, times = [], []
        rgb = av.video.reformatter.VideoReformatter()               # reused: 5x faster than per frame
        try:
            for f in box.decode(stream):
                frames.append(rgb.reformat(f, format="rgb24").to_ndarray())
                times.append(float(f.time) if f.time is not None else len(times) / FPS)
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode {path} ({e}); is it corrupt?") from e
    if not frames:
        raise ValueError(f"{path} has no decodable video frames")
    frames = np.stack(frames)
    if fps is None:
        return frames
    times = np.asarray(times) - times[0]
    step = times[1] - times[0] if len(times) > 1 else 1 / fps
    n = int(math.floor((times[-1] + step) * fps + 1e-6))
    pick = np.searchsorted(times, np.arange(n) / fps + 1e-6, side="right") - 1
    return frames[np.clip(pick, 0, len(frames) - 1)]


def load_audio(path, sample_rate=SAMPLE_RATE):
    """Any audio (or video with sound) file -> float32 mono at `sample_rate`, resampled by PyAV."""
    with _open(path, "audio") as box:
        if not box.streams.audio:
            raise ValueError(f"{path} has no audio stream; give a .wav or an mp4 with sound")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        try:
            for frame in box.decode(box.streams.audio[0]):
                chunks += [r.to_ndarray().reshape(-1) for r in resampler.resample(frame)]
            chunks += [r.to_ndarray().reshape(-1) for r in resampler.resample(None)]
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode audio in {path} ({e}); is it corrupt?") from e
    if not chunks:
        raise ValueError(f"{path} holds no audio samples")
    return np.concatenate(chunks).astype(np.float32)


def load_image(path, size):
    """An image file -> float32 (3, size, size) in [-1, 1], centre-cropped to a square and resized."""
    with _open(path, "image") as box:
        if not box.streams.video:
            raise ValueError(f"{path} is not an image")
        try:
            frame = next(box.decode(video=0)).to_ndarray(format="rgb24")
        except (av.FFmpegError, StopIteration) as e:
            raise ValueError(f"cannot decode image {path}; is it corrupt?") from e
    return to_tensor(frame[None], size)[:, 0]


def write_wav(path, audio, sample_rate=SAMPLE_RATE):
    """float mono audio in [-1, 1] -> 16-bit PCM wav (written to a temp name, then renamed)."""
    import wave
    pcm = (np.clip(np.asarray(audio, np.float32), -1, 1) * 32767).round().astype("<i2")
    tmp = f"{path}.tmp"
    with wave.open(tmp, "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    os.replace(tmp, path)


class VideoWriter:
    """Streaming H.264 mp4 writer with optional 16 kHz mono audio (AAC), deterministic.

    `with VideoWriter(path, audio=wave) as w: w.write(frames)` with uint8 frames
    (T, H, W, 3), as many calls as needed. It writes to a temp file renamed on success,
    so nothing half-written is left behind. One encoder thread and fixed settings make the
    same frames give the same bytes. yuv420p (default) plays everywhere; yuv444p keeps
    small coloured details (the mouth at 32 px) exact.
    """

    def __init__(self, path, fps=FPS, audio=None, crf=12, pix_fmt="yuv420p"):
        self.path, self.fps, self.crf, self.pix_fmt = Path(path), fps, crf, pix_fmt
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        self.box, self.stream, self.frames_written, self.samples_written = None, None, 0, 0

    def __enter__(self):
        return self

    def _start(self, H, W):
        self.box = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.box.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
        self.stream.width, self.stream.height, self.stream.pix_fmt = W, H, self.pix_fmt
        self.stream.thread_count = 1
        self.stream.options = {"crf": str(self.crf), "preset": "medium", "threads": "1"}
        if self.audio is not None:
            self.astream = self.box.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            self.astream.thread_count = 1
            self.astream.options = {"aac_coder": "fast"}  # half the time of the default coder

    def write(self, frames):
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        if self.box is None:
            H, W = frames.shape[1:3]
            if H % 2 or W % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {H}x{W}")
            self._start(H, W)
        for f in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            vf.pts = self.frames_written
            self.box.mux(self.stream.encode(vf))
            self.frames_written += 1
        if self.audio is not None:
            self._write_audio(self.frames_written * round(SAMPLE_RATE / self.fps))

    def _write_audio(self, upto):
        upto = min(upto, len(self.audio))
        while self.samples_written < upto:
            n = min(1024, upto - self.samples_written)
            chunk = self.audio[self.samples_written:self.samples_written + n]
            af = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
            af.sample_rate, af.pts = SAMPLE_RATE, self.samples_written
            self.box.mux(self.astream.encode(af))
            self.samples_written += n

    def close(self, ok=True):
        if self.box is None:
            if ok:
                raise ValueError(f"no frames were written to {self.path}")
            return
        if ok:
            self.box.mux(self.stream.encode(None))
            if self.audio is not None:
                self._write_audio(len(self.audio))
                self.box.mux(self.astream.encode(None))
        self.box.close()
        self.box = None
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)
