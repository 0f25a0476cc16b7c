"""Audio loading/checks and the video-frame-aligned log-mel frontend."""

import pickle
import shutil
import subprocess

import numpy as np
import pytest
import soundfile

from configs.common import audio_config
from vasa_jax.audio import (
    AudioError,
    MelFrontend,
    build_frontend,
    feature_dim,
    load_audio,
    log_mel_frames,
    log_mel_frames_jax,
    num_video_frames,
    prepare_audio,
)
from vasa_jax.audio import mel

SR = 16000
SPF = 640  # samples per video frame at 16 kHz, 25 fps
FLOOR = -1.0  # log-mel value of digital silence


def tone(freq, seconds, rate, amp=0.5):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return np.argmax(spectrum) * rate / audio.size


# ----------------------------------------------------------------------------- loading


def test_resample_keeps_frequency():
    out = prepare_audio(tone(440.0, 1.0, 44100), 44100, SR)
    assert out.dtype == np.float32 and out.shape == (SR,)
    assert abs(peak_hz(out, SR) - 440.0) <= 1.0
    assert abs(np.abs(out[1000:-1000]).max() - 0.5) < 0.01  # amplitude kept too


def test_stereo_downmix_either_layout():
    left, right = tone(300.0, 0.5, SR), tone(700.0, 0.5, SR, amp=0.2)
    expected = (left + right) / 2
    np.testing.assert_allclose(prepare_audio(np.stack([left, right], 1), SR), expected, atol=1e-6)
    np.testing.assert_allclose(prepare_audio(np.stack([left, right], 0), SR), expected, atol=1e-6)
    with pytest.raises(AudioError, match="channel axis"):
        prepare_audio(np.full((40, 50), 0.1, np.float32), SR)
    with pytest.raises(AudioError, match="shape"):
        prepare_audio(np.full((2, 2, 100), 0.1, np.float32), SR)


def test_integer_pcm():
    pcm = np.array([0, 16384, -32768, 32767] * 100, np.int16)
    out = prepare_audio(pcm, SR)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:4], [0.0, 0.5, -1.0, 32767 / 32768])
    unsigned = np.array([128, 192, 0, 255] * 100, np.uint8)  # 8-bit wav: offset binary
    np.testing.assert_allclose(prepare_audio(unsigned, SR)[:4], [0.0, 0.5, -1.0, 127 / 128])
    with pytest.raises(AudioError, match="integer PCM or float"):
        prepare_audio(np.ones(100, bool), SR)


def test_bad_audio_errors():
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(np.zeros((0, 2), np.int16), SR)
    noisy = tone(200.0, 0.1, SR)
    for bad in (np.nan, np.inf):
        x = noisy.copy()
        x[17] = bad
        with pytest.raises(AudioError, match="NaN or inf"):
            prepare_audio(x, SR)
    with pytest.raises(AudioError, match="sample rate"):
        prepare_audio(noisy, 0)
    with pytest.raises(AudioError, match="source_rate"):
        load_audio(noisy)


def test_silence_rejected_unless_allowed():
    silent = np.zeros(SR, np.float32)
    quiet = (1e-5 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)  # -100 dBFS
    for x in (silent, quiet, np.zeros(SR, np.int16)):
        with pytest.raises(AudioError, match="silent.*allow_silence"):
            prepare_audio(x, SR)
    out = prepare_audio(silent, SR, allow_silence=True)
    assert out.shape == (SR,) and not out.any()
    assert load_audio(quiet, source_rate=SR, allow_silence=True).shape == (SR,)
    prepare_audio(tone(200.0, 1.0, SR, amp=1e-3), SR)  # -63 dBFS speech level still passes


def test_load_wav_and_flac(tmp_path):
    stereo = np.stack([tone(440.0, 1.0, 22050), tone(440.0, 1.0, 22050)], 1)
    soundfile.write(tmp_path / "a.wav", stereo, 22050, subtype="PCM_16")
    soundfile.write(tmp_path / "a.flac", stereo, 22050)
    for name in ("a.wav", "a.flac"):
        out = load_audio(tmp_path / name)  # path-like works
        assert out.dtype == np.float32 and out.shape == (SR,)
        assert abs(peak_hz(out, SR) - 440.0) <= 1.0
    assert load_audio(str(tmp_path / "a.wav"), sample_rate=8000).shape == (8000,)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg binary")
def test_load_compressed_via_ffmpeg(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(440.0, 1.0, 44100), 44100)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(tmp_path / "a.wav"), "-c:a", "aac"]
    subprocess.run(cmd + [str(tmp_path / "a.m4a")], check=True)
    out = load_audio(tmp_path / "a.m4a")  # libsndfile cannot read m4a: the ffmpeg path
    assert abs(out.size - SR) < 0.05 * SR  # aac adds priming/padding samples
    assert abs(peak_hz(out, SR) - 440.0) <= 2.0


def test_undecodable_files(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEthis is not audio" * 4)
    with pytest.raises(AudioError, match="broken.wav") as info:
        load_audio(bad)
    assert "decode" in str(info.value)
    with pytest.raises(AudioError, match="missing.wav: no such audio file"):
        load_audio(tmp_path / "missing.wav")
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), SR)
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(tmp_path / "empty.wav")


# ----------------------------------------------------------------------------- log-mel


@pytest.mark.parametrize(
    "num_samples,frames",
    [(0, 0), (319, 0), (320, 1), (640, 1), (959, 1), (960, 2), (64000, 100), (64321, 101)],
)
def test_num_frames_rounds(num_samples, frames):
    audio = np.full(num_samples, 0.1, np.float32)
    assert num_video_frames(num_samples) == frames
    assert log_mel_frames(audio).shape == (frames, 320)


def test_window_centres_inside_their_frame():
    for fps in (25.0, 30.0, 24.0):
        spf = SR / fps
        starts = mel._window_starts(20, SR, fps, 400)
        centres = (starts + 200).reshape(20, mel.COLUMNS_PER_FRAME)
        t = np.arange(20)[:, None]
        assert np.all(centres >= t * spf) and np.all(centres < (t + 1) * spf)
        # Symmetric about the frame centre, to the rounding of one sample.
        assert np.all(np.abs(centres.mean(1) - (t[:, 0] + 0.5) * spf) <= 0.5)
    np.testing.assert_array_equal(mel._window_starts(1, SR, 25.0, 400), [-120, 40, 200, 360])


def test_click_lands_in_its_frame():
    """A 2 ms burst inside frame t (away from the 120-sample window overhang) lights up
    frame t only; everything else is exact digital silence."""
    rng = np.random.default_rng(0)
    for frame, offset in [(0, 200), (37, 320), (37, 140), (99, 500), (61, 480)]:
        audio = np.zeros(100 * SPF, np.float32)
        start = frame * SPF + offset - 16
        audio[start:start + 32] = rng.uniform(-0.5, 0.5, 32)
        feats = log_mel_frames(audio)
        assert feats.shape == (100, 320)
        loud = np.flatnonzero(np.any(feats > FLOOR + 1e-4, axis=1))  # rounding-safe
        assert loud.tolist() == [frame], (frame, offset, loud)


def test_click_lands_in_its_column():
    """Within a frame, the burst peaks in the 10 ms column whose centre it sits on."""
    for j in range(mel.COLUMNS_PER_FRAME):
        audio = np.zeros(50 * SPF, np.float32)
        centre = 21 * SPF + 80 + 160 * j
        audio[centre - 4:centre + 4] = 0.5
        columns = log_mel_frames(audio).reshape(50 * mel.COLUMNS_PER_FRAME, 80)
        assert np.argmax(columns.sum(1)) == 21 * mel.COLUMNS_PER_FRAME + j


def test_onset_frame():
    """A tone switched on at frame 30's first sample: frames up to 28 are silent, frame 29
    only in its last column (whose window overhangs the onset by 120 samples), 30.. loud."""
    audio = np.zeros(60 * SPF, np.float32)
    audio[30 * SPF:] = tone(500.0, 30 * SPF / SR, SR)
    loud = log_mel_frames(audio).reshape(60, mel.COLUMNS_PER_FRAME, 80).max(-1) > FLOOR + 0.5
    assert not loud[:29].any()
    assert loud[29].tolist() == [False, False, False, True]
    assert loud[30:].all()


def test_tone_in_right_mel_band():
    feats = log_mel_frames(tone(1000.0, 1.0, SR)).reshape(-1, 80)
    edges = mel._mel_to_hz(np.linspace(0.0, mel._hz_to_mel(SR / 2), 82))
    centre_hz = edges[1:-1][np.argmax(feats[10:-10].mean(0))]
    assert abs(centre_hz - 1000.0) < 60.0


def test_matches_reference_stft():
    """Same numbers as scipy's STFT + librosa's mel filters, windows placed per the contract."""
    import scipy.signal

    librosa = pytest.importorskip("librosa")
    audio = (0.1 * np.random.default_rng(1).standard_normal(10 * SPF)).astype(np.float32)
    ours = log_mel_frames(audio).reshape(40, 80)
    # Segment k of the padded signal starts at sample 160 k - 120 of the clip.
    padded = np.pad(audio.astype(np.float64), (120, 400))
    window = scipy.signal.get_window("hann", 400)  # periodic
    _, _, spec = scipy.signal.stft(padded, window=window, nperseg=400, noverlap=240, nfft=512,
                                   boundary=None, padded=False, detrend=False, scaling="spectrum")
    power = np.abs(spec[:, :40].T * window.sum()) ** 2  # undo scipy's 1 / sum(window) scaling
    filters = librosa.filters.mel(sr=SR, n_fft=512, n_mels=80)  # [80, 257], Slaney
    np.testing.assert_allclose(mel.mel_filterbank(SR, 512, 80), filters.T, atol=1e-7)
    expected = (np.log10(np.maximum(power @ filters.T, 1e-8)) + 4) / 4
    np.testing.assert_allclose(ours, expected, atol=2e-4)


def test_num_frames_pad_and_trim():
    audio = tone(300.0, 4.0, SR) * np.linspace(0, 1, 4 * SR, dtype=np.float32)
    full = log_mel_frames(audio)
    assert full.shape == (100, 320)
    np.testing.assert_allclose(log_mel_frames(audio, num_frames=10), full[:10], atol=1e-5)
    longer = log_mel_frames(audio, num_frames=120)
    np.testing.assert_allclose(longer[:100], full, atol=1e-5)
    # past the end: silence (frame 100 overhangs the end)
    np.testing.assert_allclose(longer[101:], FLOOR, atol=1e-5)
    assert log_mel_frames(audio, num_frames=0).shape == (0, 320)
    with pytest.raises(AudioError, match="num_frames"):
        log_mel_frames(audio, num_frames=-1)


def test_log_mel_input_checks():
    with pytest.raises(AudioError, match="float"):
        log_mel_frames(np.zeros(SR, np.int16))
    with pytest.raises(AudioError, match="mono"):
        log_mel_frames(np.zeros((2, SR), np.float32))
    x = tone(300.0, 0.5, SR)
    x[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        log_mel_frames(x)


def test_jax_matches_numpy():
    audio = tone(250.0, 1.2, SR) + tone(2500.0, 1.2, SR, amp=0.1)
    ref = log_mel_frames(audio, num_frames=31)
    out = log_mel_frames_jax(audio, num_frames=31)
    assert out.shape == (31, 320)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
    batch = log_mel_frames_jax(np.stack([audio, audio[::-1]]))  # [B, N] -> [B, T, D]
    assert batch.shape == (2, 30, 320)
    np.testing.assert_allclose(np.asarray(batch[1]), log_mel_frames(audio[::-1].copy()), atol=1e-4)


def test_frontend_from_config():
    cfg = audio_config()
    assert feature_dim(cfg) == 320
    assert feature_dim(n_mels=64) == 256
    frontend = build_frontend(cfg)
    assert isinstance(frontend, MelFrontend) and frontend.dim == 320
    frontend = pickle.loads(pickle.dumps(frontend))  # grain workers pickle their transforms
    audio = tone(300.0, 1.0, SR)
    np.testing.assert_allclose(frontend(audio, 20), log_mel_frames(audio, num_frames=20),
                               atol=1e-5)
    cfg.frontend = "spectrogram"
    with pytest.raises(ValueError, match="not one of"):
        feature_dim(cfg)
