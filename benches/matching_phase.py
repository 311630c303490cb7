# Linear against minimum phase for the matching EQ, on the same band gains (what each band of the
# target lacks against the reference, clamped to ±12 dB, interpolated over log frequency): the
# peak-to-loudness ratio each leaves (true peak by 4x oversampling, over RMS) and the spectral
# error. `python3 benches/matching_phase.py target.flac reference.flac` (numpy, scipy, soundfile:
# what Matchering installs). Figures in BENCHMARKS.md.
import sys, numpy as np, soundfile as sf
from scipy.signal import resample_poly, fftconvolve
x, r = sf.read(sys.argv[1]); y, _ = sf.read(sys.argv[2])
def bands(x, r):
    n = 1<<int(np.ceil(np.log2(r*2/3)))
    w = np.hanning(n); P = np.zeros(n//2+1)
    for s in range(0, len(x)-n, n//2):
        for c in range(2): P += np.abs(np.fft.rfft(x[s:s+n,c]*w))**2
    f = np.fft.rfftfreq(n, 1/r); out=[]
    for i in range(25):
        c=10**((15+i)/10); lo,hi=c*10**-0.05,c*10**0.05
        out.append(10*np.log10(P[(f>=lo)&(f<hi)].sum()+1e-30))
    return np.array(out)
d = (bands(y,r)-bands(y,r).mean()) - (bands(x,r)-bands(x,r).mean())
g = np.clip(d - np.median(d), -12, 12)
centres = 10**((15+np.arange(25))/10)
taps = 16384
f = np.fft.rfftfreq(taps, 1/r)
mag = 10**(np.interp(np.log(np.maximum(f,1)), np.log(centres), g)/20)
lin = np.roll(np.fft.irfft(mag, taps), taps//2) * np.hanning(taps+1)[:taps]
N = taps*4
f4 = np.fft.rfftfreq(N, 1/r); mag4 = 10**(np.interp(np.log(np.maximum(f4,1)), np.log(centres), g)/20)
c = np.fft.irfft(np.log(mag4), N)
fold = np.zeros(N); fold[0]=c[0]; fold[1:N//2]=2*c[1:N//2]; fold[N//2]=c[N//2]
mnp = np.fft.irfft(np.exp(np.fft.rfft(fold)), N)[:taps] * np.hanning(2*taps+1)[taps:2*taps]
def tp(z): return 20*np.log10(np.max(np.abs(resample_poly(z, 4, 1, axis=0))))
print(sys.argv[1], '->', sys.argv[2], 'unfiltered PLR', round(tp(x) - 10*np.log10(np.mean(x**2)),2))
for name, h in [('linear', lin), ('minimum', mnp)]:
    z = np.stack([fftconvolve(x[:,ch], h) for ch in range(2)], 1)
    z = z[taps//2: taps//2+len(x)] if name=='linear' else z[:len(x)]
    e = (bands(y,r)-bands(y,r).mean()) - (bands(z,r)-bands(z,r).mean())
    print(' ', name, 'true peak - rms', round(tp(z)-10*np.log10(np.mean(z**2)),2), 'dB; spectral error', round(np.sqrt(np.mean(e**2)),2))
