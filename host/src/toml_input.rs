//! Operator-written TOML (manifests, config) with errors that name the key.
//!
//! Syntax errors carry the line and column, never the text there: the file may not
//! be what it claims (a manifest that is a link to a secret must not have the
//! secret quoted into a log). Type errors carry the key's path
//! (`sampler.interval-ms: invalid type ...`), which `toml`'s own errors lose inside
//! nested tables.

use serde::de::DeserializeOwned;

pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_string();
    };
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let message = error.message().lines().next().unwrap_or("syntax error");
    format!("line {line_no}, column {column}: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Inner {
        interval_ms: u64,
    }

    #[test]
    fn type_errors_name_the_key_path() {
        let err = parse::<Outer>("[inner]\ninterval-ms = \"often\"\n").unwrap_err();
        assert!(err.starts_with("inner.interval-ms: invalid type"), "{err}");
    }

    #[test]
    fn syntax_errors_say_where_without_quoting_the_text() {
        let err = parse::<Outer>("[inner]\ninterval-ms = = 3\n").unwrap_err();
        assert!(err.starts_with("line 2, column 15:"), "{err}");
        assert!(!err.contains("interval-ms"), "{err}");
        let err = parse::<Outer>("s3cr3t-value-0123456789\n").unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}
