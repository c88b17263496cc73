//! Sampler specs as users write them: `uniform`, `pop:0.75`, `decay:7d`, `dns:32`,
//! `dns:32:pop:0.75`, `inbatch:1024`, `mix:0.5*pop:0.75+0.5*dns:32`.

use crate::samplers::{AnySampler, Decay, Dns, InBatch, Mix, Popularity, Uniform};

/// Default exponent of `pop` (word2vec's 0.75).
pub const DEFAULT_POP_ALPHA: f64 = 0.75;
/// Default ring size of `inbatch`.
pub const DEFAULT_INBATCH: usize = 1024;

/// A validated sampler spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplerSpec(String);

/// What is valid, for error messages.
const GRAMMAR: &str =
    "uniform | pop[:ALPHA] | decay:HALF_LIFE | dns:M[:BASE] | inbatch[:B] | mix:W*SPEC+W*SPEC...";

impl SamplerSpec {
    /// Parses and validates a spec.
    pub fn parse(spec: &str) -> Result<Self, String> {
        build(spec.trim(), true)?;
        Ok(Self(spec.trim().to_string()))
    }

    /// A new sampler for this spec (each variant and worker gets its own).
    pub fn build(&self) -> AnySampler {
        // Validated in `parse`; a failure here would be a bug, and uniform is safe.
        build(&self.0, true).unwrap_or(AnySampler::Uniform(Uniform))
    }

    /// The spec as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SamplerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn number<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a valid number"))
}

/// Parses `90s`, `30min`, `12h`, `7d`, `250ms` into milliseconds.
fn duration_ms(s: &str) -> Result<f64, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = number(n, "duration")?;
    let scale = match unit {
        "ms" => 1.0,
        "s" | "sec" => 1e3,
        "m" | "min" => 60e3,
        "h" | "hour" | "hours" => 3600e3,
        "d" | "day" | "days" => 86_400e3,
        "w" | "week" | "weeks" => 7.0 * 86_400e3,
        "" => return Err(format!("duration {s:?} needs a unit (ms, s, min, h, d, w)")),
        other => {
            return Err(format!(
                "unknown time unit {other:?} in {s:?} (ms, s, min, h, d, w)"
            ))
        }
    };
    let ms = n * scale;
    if ms > 0.0 && ms.is_finite() {
        Ok(ms)
    } else {
        Err(format!("duration {s:?} must be positive"))
    }
}

fn build(spec: &str, allow_mix: bool) -> Result<AnySampler, String> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    Ok(match kind {
        "uniform" if rest.is_empty() => AnySampler::Uniform(Uniform),
        "pop" => {
            let alpha = if rest.is_empty() {
                DEFAULT_POP_ALPHA
            } else {
                number(rest, "pop exponent")?
            };
            if !(0.0..=4.0).contains(&alpha) {
                return Err(format!("pop exponent must be in [0, 4], got {alpha}"));
            }
            AnySampler::Popularity(Popularity::new(alpha))
        }
        "decay" if !rest.is_empty() => AnySampler::Decay(Decay::new(duration_ms(rest)?)),
        "dns" if !rest.is_empty() => {
            let (m, base) = rest.split_once(':').unwrap_or((rest, "uniform"));
            let m: usize = number(m, "dns candidates")?;
            if m == 0 || m > 4096 {
                return Err(format!("dns candidates must be in 1..=4096, got {m}"));
            }
            let base = build(base, false)?;
            if matches!(base, AnySampler::Dns(_)) {
                return Err("dns cannot use dns as its base".into());
            }
            AnySampler::Dns(Dns::new(m, base))
        }
        "inbatch" => {
            let b = if rest.is_empty() {
                DEFAULT_INBATCH
            } else {
                number(rest, "inbatch size")?
            };
            if b == 0 {
                return Err("inbatch size must be at least 1".into());
            }
            AnySampler::InBatch(InBatch::new(b))
        }
        "mix" if allow_mix && !rest.is_empty() => {
            let mut parts = Vec::new();
            for part in rest.split('+') {
                let (w, s) = part
                    .split_once('*')
                    .ok_or_else(|| format!("mix part {part:?} must be WEIGHT*SPEC"))?;
                let w: f64 = number(w, "mix weight")?;
                if !(w > 0.0 && w.is_finite()) {
                    return Err(format!("mix weight must be positive, got {w}"));
                }
                parts.push((w, build(s, false)?));
            }
            AnySampler::Mix(Mix::new(parts))
        }
        "mix" if !allow_mix => return Err("mixtures cannot be nested".into()),
        _ => return Err(format!("unknown sampler {spec:?}; valid: {GRAMMAR}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sampler;

    #[test]
    fn parses_every_kind() {
        for (spec, name) in [
            ("uniform", "uniform"),
            ("pop", "pop:0.75"),
            ("pop:0.5", "pop:0.5"),
            ("decay:1h", "decay:3600000ms"),
            ("dns:32", "dns:32"),
            ("dns:8:pop:1", "dns:8:pop:1"),
            ("inbatch", "inbatch:1024"),
            ("mix:1*pop:0.75+1*dns:16", "mix:1*pop:0.75+1*dns:16"),
        ] {
            let s = SamplerSpec::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(s.build().name(), name);
        }
    }

    #[test]
    fn rejects_with_reasons() {
        for (spec, reason) in [
            ("zipf", "valid: uniform"),
            ("pop:x", "not a valid number"),
            ("decay:5", "needs a unit"),
            ("decay", "valid:"),
            ("dns:0", "1..=4096"),
            ("dns:4:dns:4", "cannot use dns"),
            ("mix:1*mix:1*pop", "cannot be nested"),
            ("mix:pop", "WEIGHT*SPEC"),
            ("mix:-1*pop", "positive"),
        ] {
            let err = SamplerSpec::parse(spec).unwrap_err();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }
}
