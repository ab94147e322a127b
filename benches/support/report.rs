//! What the plain-`main` benches that write results share (`benches/e2e.rs`,
//! `benches/scale.rs`, `benches/overhead.rs`): the command line's filters, percentiles and
//! medians, and a small JSON writer for `<target dir>/tower-timeouts-bench/<name>.json`.

use std::fmt::{self, Write as _};
use std::path::PathBuf;

/// Whether the bench `name` should run, given the command line `cargo bench` passes on.
///
/// The bench runs when there is no [`filters`] argument, or when one of them is part of `name`
/// or has `name` in it (so `cargo bench -- foo` skips it, and `cargo bench -- e2e` or
/// `-- scale/` runs it).
pub fn selected(name: &str) -> bool {
    let filters = filters();
    filters.is_empty()
        || filters
            .iter()
            .any(|filter| name.contains(filter.as_str()) || filter.contains(name))
}

/// The filter arguments on the command line `cargo bench` passes on: every argument but the
/// flags (`--bench`, criterion's `--save-baseline x`, …) and the value after the criterion flags
/// that take one.
pub fn filters() -> Vec<String> {
    const TAKES_VALUE: &[&str] = &[
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--color",
        "--format",
        "--logfile",
        "--output-format",
        "--plotting-backend",
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
    ];
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg.starts_with('-') {
            if TAKES_VALUE.contains(&arg.as_str()) {
                args.next();
            }
            continue;
        }
        filters.push(arg);
    }
    filters
}

/// `<target dir>/tower-timeouts-bench/<file>`: the target dir is `$CARGO_TARGET_DIR` when it
/// is set, `target` under the crate root otherwise.
pub fn results_path(file: &str) -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
    };
    target.join("tower-timeouts-bench").join(file)
}

/// Writes `json` to [`results_path`]`(file)`, creating the directory, and says where.
pub fn write_json(file: &str, json: &Json) {
    let path = results_path(file);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the results directory");
    }
    std::fs::write(&path, format!("{json}\n")).expect("write the results");
    println!("\nresults written to {}", path.display());
}

/// The value at quantile `q` (0..=1) of `sorted`, nearest rank; 0 when empty.
pub fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Just enough JSON for the results files.
#[derive(Clone, Debug)]
pub enum Json {
    Null,
    Bool(bool),
    /// Written with up to 3 decimals; NaN and infinities become `null`.
    Num(f64),
    Int(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs, in order.
    pub fn obj<K: Into<String>>(fields: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn str(s: impl Into<String>) -> Json {
        Json::Str(s.into())
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, indent: usize) -> fmt::Result {
        let pad = |f: &mut fmt::Formatter<'_>, n: usize| write!(f, "{:1$}", "", n * 2);
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(x) if x.is_finite() => {
                let mut s = format!("{x:.3}");
                while s.ends_with('0') {
                    s.pop();
                }
                if s.ends_with('.') {
                    s.pop();
                }
                f.write_str(&s)
            }
            Json::Num(_) => f.write_str("null"),
            Json::Int(i) => write!(f, "{i}"),
            Json::Str(s) => write_str(f, s),
            Json::Arr(items) if items.is_empty() => f.write_str("[]"),
            Json::Arr(items) => {
                f.write_str("[\n")?;
                for (i, item) in items.iter().enumerate() {
                    pad(f, indent + 1)?;
                    item.write(f, indent + 1)?;
                    f.write_str(if i + 1 < items.len() { ",\n" } else { "\n" })?;
                }
                pad(f, indent)?;
                f.write_str("]")
            }
            Json::Obj(fields) if fields.is_empty() => f.write_str("{}"),
            Json::Obj(fields) => {
                f.write_str("{\n")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    pad(f, indent + 1)?;
                    write_str(f, key)?;
                    f.write_str(": ")?;
                    value.write(f, indent + 1)?;
                    f.write_str(if i + 1 < fields.len() { ",\n" } else { "\n" })?;
                }
                pad(f, indent)?;
                f.write_str("}")
            }
        }
    }
}

fn write_str(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, 0)
    }
}

impl From<f64> for Json {
    fn from(x: f64) -> Json {
        Json::Num(x)
    }
}

impl From<u64> for Json {
    fn from(x: u64) -> Json {
        Json::Int(x as i64)
    }
}

impl From<usize> for Json {
    fn from(x: usize) -> Json {
        Json::Int(x as i64)
    }
}

impl From<bool> for Json {
    fn from(b: bool) -> Json {
        Json::Bool(b)
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::Str(s.to_owned())
    }
}

impl<T: Into<Json>> From<Option<T>> for Json {
    fn from(x: Option<T>) -> Json {
        x.map_or(Json::Null, Into::into)
    }
}
