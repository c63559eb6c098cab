//! Clearer errors for common TOML mistakes, whose parser and serde messages do not say what to
//! write ("invalid float, expected `nan`" for an unquoted word, "invalid type: map, expected a
//! sequence" for `[vip]`). Used only once the file has been refused: each hint names a mistake
//! found in the file's own text or table structure (never read out of an error message), which
//! is an error in itself, at the offending value.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// A clearer error than the parser's for a common mistake in `text`, if it holds one: where, and
/// what to write instead.
pub(super) fn for_mistake(text: &str, error_at: Option<usize>) -> Option<(Range<usize>, String)> {
    match DeTable::parse(text) {
        Err(_) => unquoted_word(text, error_at?),
        Ok(root) => misshapen(root.get_ref()),
    }
}

/// A syntax error inside a value written as a bare word (`xdp_mode = native`,
/// `address = 198.18.0.1`): TOML strings need quotes.
fn unquoted_word(text: &str, at: usize) -> Option<(Range<usize>, String)> {
    let at = at.min(text.len());
    if !text.is_char_boundary(at) {
        return None;
    }
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let line = &text[start..end];
    let eq = line.find('=')?;
    let key = line[..eq].trim();
    let bare_key = |k: &str| {
        !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    };
    let rest = &line[eq + 1..];
    let value_at = start + eq + 1 + (rest.len() - rest.trim_start().len());
    let value = rest.split('#').next().unwrap_or("").trim();
    let word = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b))
        && !matches!(value, "true" | "false");
    if !bare_key(key) || !word || at < value_at || at > value_at + value.len() {
        return None;
    }
    Some((
        value_at..value_at + value.len(),
        format!("`{value}` is not a TOML value: strings need quotes, write {key} = \"{value}\""),
    ))
}

/// A table where the schema has an array of tables or the reverse (`[vip]`, `[[node]]`,
/// `[vip.route]`, `[[vip.health]]`), a backend written as a bare address, a single interface
/// written as a string.
fn misshapen(root: &DeTable<'_>) -> Option<(Range<usize>, String)> {
    for table in ["node", "metrics"] {
        if let Some((span, DeValue::Array(_))) = get(root, table) {
            return Some((
                span,
                format!("write [{table}], not [[{table}]]: there is one {table} table"),
            ));
        }
    }
    if let Some((_, DeValue::Table(node))) = get(root, "node")
        && let Some((span, DeValue::String(s))) = get(node, "interfaces")
    {
        return Some((span, format!("node.interfaces is a list: write interfaces = [\"{s}\"]")));
    }
    match get(root, "vip") {
        Some((span, DeValue::Table(_))) => {
            return Some((span, "write [[vip]], not [vip]: each VIP is an array entry".to_owned()));
        }
        Some((_, DeValue::Array(vips))) => {
            for vip in vips.iter() {
                let DeValue::Table(vip) = vip.get_ref() else { continue };
                for table in ["health", "l7"] {
                    if let Some((span, DeValue::Array(_))) = get(vip, table) {
                        return Some((
                            span,
                            format!(
                                "write [vip.{table}], not [[vip.{table}]]: a VIP has one {table} table"
                            ),
                        ));
                    }
                }
                if let Some(hint) = backends_hint(get(vip, "backends"), "vip") {
                    return Some(hint);
                }
                match get(vip, "route") {
                    Some((span, DeValue::Table(_))) => {
                        return Some((
                            span,
                            "write [[vip.route]], not [vip.route]: each route is an array entry"
                                .to_owned(),
                        ));
                    }
                    Some((_, DeValue::Array(routes))) => {
                        for route in routes.iter() {
                            let DeValue::Table(route) = route.get_ref() else { continue };
                            if let Some(hint) = backends_hint(get(route, "backends"), "vip.route") {
                                return Some(hint);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    None
}

/// The value of `key` in `t`, with its span.
fn get<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<(Range<usize>, &'a DeValue<'i>)> {
    t.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| (v.span(), v.get_ref()))
}

/// A `backends` value that is not a list of tables.
fn backends_hint(
    backends: Option<(Range<usize>, &DeValue<'_>)>,
    parent: &str,
) -> Option<(Range<usize>, String)> {
    match backends? {
        (_, DeValue::Array(list)) => list.iter().find_map(|b| match b.get_ref() {
            DeValue::String(s) => {
                Some((b.span(), format!("a backend is a table: write {{ address = \"{s}\" }}")))
            }
            _ => None,
        }),
        (span, DeValue::Table(_)) => Some((
            span,
            format!(
                "`backends` is a list: write backends = [{{ address = \"...\" }}, ...] (or one [[{parent}.backends]] table per backend)"
            ),
        )),
        _ => None,
    }
}
