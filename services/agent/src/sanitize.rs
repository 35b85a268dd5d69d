//! Checks template variables before rendering: markup injection (script
//! and other executable elements, script URLs, inline event handlers) in
//! any case, spacing, entity, percent or JavaScript escape encoding;
//! control and bidirectional-override characters; and size limits.
//!
//! Detection decodes a copy of the value (up to three rounds of HTML
//! entities, percent-encoding and `\x`/`\u` escapes, then lower case), so
//! `&#x3C;ScRiPt&#x3E;` and `%253Cscript%253E` are caught like `<script>`.
//! Under the `reject` policy every hit is a field violation; under `escape`
//! a flagged value is HTML-escaped with its script URLs neutralised and
//! control characters removed. Ordinary text passes unchanged: code
//! (`a < b`, `window.onload = init`), maths, and prose with "on" words.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use agentmesh_resilience::FieldViolation;
use agentmesh_settings::SanitizePolicy;
use regex::Regex;

/// Most variables per request.
pub const MAX_VARIABLES: usize = 64;
/// Most bytes of one value.
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
/// Most bytes of all values together.
pub const MAX_TOTAL_BYTES: usize = 256 * 1024;

/// Rule text of executable elements.
pub const RULE_SCRIPT_TAG: &str = "must not contain <script> or other executable elements (iframe, frame, object, embed, applet, base)";
/// Rule text of script URLs.
pub const RULE_SCRIPT_URL: &str = "must not contain javascript:, vbscript: or data:text/html URLs";
/// Rule text of inline event handlers.
pub const RULE_EVENT_HANDLER: &str = "must not contain inline event handlers (on...=)";
/// Rule text of control characters.
pub const RULE_CONTROL: &str = "must not contain control characters other than newline, carriage return and tab, nor bidirectional overrides";

#[allow(clippy::expect_used)] // constant patterns, covered by tests
fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant regex is valid")
}

static SCRIPT_TAG: LazyLock<Regex> =
    LazyLock::new(|| regex(r"<\s*/?\s*(script|iframe|frame|object|embed|applet|base)\b"));
/// A script scheme used as a URL: glued to what follows, or right after a
/// quote, `=`, `(` or `<` (an attribute or link), never plain prose such as
/// "I like javascript: it is flexible".
static SCRIPT_URL: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r#"(?:java|vb|live)script\s*:\S|data\s*:\s*text/html|["'=(<`]\s*(?:java|vb|live)script\s*:"#,
    )
});
/// A script scheme, letters possibly split by whitespace, for escaping.
static SCRIPT_SCHEME: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?:j\s*a\s*v\s*a|v\s*b|l\s*i\s*v\s*e)\s*s\s*c\s*r\s*i\s*p\s*t\s*:|d\s*a\s*t\s*a\s*:\s*t\s*e\s*x\s*t\s*/\s*h\s*t\s*m\s*l",
    )
});
static HANDLER_IN_TAG: LazyLock<Regex> =
    LazyLock::new(|| regex(r#"<[a-z!/][^>]*[\s"'/]on[a-z]+\s*="#));
static HANDLER_AFTER_QUOTE: LazyLock<Regex> =
    LazyLock::new(|| regex(r#"["'`]\s*/?\s*on[a-z]+\s*="#));
static KNOWN_HANDLER: LazyLock<Regex> = LazyLock::new(|| {
    regex(
        r"(?:^|[^\w.$])on(?:load|error|click|dblclick|mouse[a-z]+|key[a-z]+|focus[a-z]*|blur|change|input|submit|toggle|begin|end|animation[a-z]+|transition[a-z]+|pointer[a-z]+|touch[a-z]+|drag[a-z]*|drop|scroll|wheel|resize|pageshow|hashchange|message|beforeunload|unload|copy|cut|paste|play|ended|canplay[a-z]*|loadstart|select|invalid|contextmenu|auxclick|show|start|finish|readystatechange|search|beforeprint|afterprint)\s*=",
    )
});
static NUMERIC_ENTITY: LazyLock<Regex> = LazyLock::new(|| regex(r"(?i)&#(x[0-9a-f]+|[0-9]+);?"));
static NAMED_ENTITY: LazyLock<Regex> = LazyLock::new(|| {
    regex(r"(?i)&(lt|gt|quot|apos|amp|colon|tab|newline|sol|lpar|rpar|equals|grave|nbsp);?")
});
static PERCENT: LazyLock<Regex> = LazyLock::new(|| regex(r"%([0-9a-fA-F]{2})"));
static JS_ESCAPE: LazyLock<Regex> =
    LazyLock::new(|| regex(r"(?i)\\(?:x([0-9a-f]{2})|u\{([0-9a-f]{1,6})\}|u([0-9a-f]{4}))"));

fn from_code(code: u32) -> String {
    char::from_u32(code).map(String::from).unwrap_or_default()
}

/// One decoding round over entities, percent-encoding and JS escapes.
fn decode_once(text: &str) -> String {
    let text = NUMERIC_ENTITY.replace_all(text, |captures: &regex::Captures<'_>| {
        let digits = &captures[1];
        let code = match digits.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => digits.parse::<u32>().ok(),
        };
        code.map(from_code).unwrap_or_default()
    });
    let text = NAMED_ENTITY.replace_all(&text, |captures: &regex::Captures<'_>| {
        match captures[1].to_ascii_lowercase().as_str() {
            "lt" => "<",
            "gt" => ">",
            "quot" => "\"",
            "apos" => "'",
            "amp" => "&",
            "colon" => ":",
            "tab" => "\t",
            "newline" => "\n",
            "sol" => "/",
            "lpar" => "(",
            "rpar" => ")",
            "equals" => "=",
            "grave" => "`",
            _ => " ",
        }
        .to_owned()
    });
    let text = PERCENT.replace_all(&text, |captures: &regex::Captures<'_>| {
        u32::from_str_radix(&captures[1], 16)
            .ok()
            .map(from_code)
            .unwrap_or_default()
    });
    JS_ESCAPE
        .replace_all(&text, |captures: &regex::Captures<'_>| {
            let hex = captures
                .get(1)
                .or_else(|| captures.get(2))
                .or_else(|| captures.get(3))
                .map_or("", |found| found.as_str());
            u32::from_str_radix(hex, 16)
                .ok()
                .map(from_code)
                .unwrap_or_default()
        })
        .into_owned()
}

/// The value as a browser might end up seeing it: decoded (up to three
/// rounds), with NUL and other control characters removed, lower case.
fn normalise(value: &str) -> String {
    let mut current = value.to_owned();
    for _ in 0..3 {
        let next = decode_once(&current);
        if next == current {
            break;
        }
        current = next;
    }
    current
        .chars()
        .filter(|c| !c.is_control() || matches!(c, '\n' | '\t' | '\r'))
        .collect::<String>()
        .to_lowercase()
}

fn is_forbidden_char(c: char) -> bool {
    (c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// The markup and character rules a value breaks, in a stable order.
pub fn inspect(value: &str) -> Vec<&'static str> {
    let mut broken = Vec::new();
    let normal = normalise(value);
    // Whitespace inside a scheme name (`java\tscript:`) is ignored by
    // browsers; check a copy without it too.
    let compact: String = normal.chars().filter(|c| !c.is_whitespace()).collect();
    if SCRIPT_TAG.is_match(&normal) || SCRIPT_TAG.is_match(&compact) {
        broken.push(RULE_SCRIPT_TAG);
    }
    let squeezed_schemes = regex_replace_scheme_spaces(&normal);
    if SCRIPT_URL.is_match(&normal) || SCRIPT_URL.is_match(&squeezed_schemes) {
        broken.push(RULE_SCRIPT_URL);
    }
    if HANDLER_IN_TAG.is_match(&normal)
        || HANDLER_AFTER_QUOTE.is_match(&normal)
        || KNOWN_HANDLER.is_match(&normal)
    {
        broken.push(RULE_EVENT_HANDLER);
    }
    if value.chars().any(is_forbidden_char) {
        broken.push(RULE_CONTROL);
    }
    broken
}

/// Joins a scheme name split by whitespace (`java script:`, `jav\tascript:`)
/// only where the letters spell a script scheme, so prose keeps its spaces.
fn regex_replace_scheme_spaces(text: &str) -> String {
    static SPLIT_SCHEME: LazyLock<Regex> = LazyLock::new(|| {
        regex(r"j\s*a\s*v\s*a\s*s\s*c\s*r\s*i\s*p\s*t\s*:|v\s*b\s*s\s*c\s*r\s*i\s*p\s*t\s*:")
    });
    SPLIT_SCHEME
        .replace_all(text, |captures: &regex::Captures<'_>| {
            captures[0]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
        })
        .into_owned()
}

/// HTML-escapes a value, neutralises script schemes and removes control
/// and bidirectional-override characters.
pub fn escape(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() + 16);
    for c in value.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            '`' => escaped.push_str("&#96;"),
            c if is_forbidden_char(c) => {}
            c => escaped.push(c),
        }
    }
    let case_insensitive = escaped.to_lowercase();
    if !SCRIPT_SCHEME.is_match(&case_insensitive) {
        return escaped;
    }
    // Replace the colon of every script scheme (found case-insensitively;
    // lower-casing keeps byte offsets for ASCII, so map through char
    // indices to stay safe for any text).
    let mut result = String::with_capacity(escaped.len() + 8);
    let lower_chars: Vec<char> = escaped.chars().flat_map(char::to_lowercase).collect();
    let original: Vec<char> = escaped.chars().collect();
    if lower_chars.len() != original.len() {
        // Exotic case mappings: fall back to replacing every colon.
        return escaped.replace(':', "&#58;");
    }
    let lower: String = lower_chars.iter().collect();
    let mut colon_positions = Vec::new();
    for found in SCRIPT_SCHEME.find_iter(&lower) {
        let char_start = lower[..found.start()].chars().count();
        let char_len = found.as_str().chars().count();
        for offset in 0..char_len {
            if lower_chars[char_start + offset] == ':' {
                colon_positions.push(char_start + offset);
            }
        }
        // data:text/html: neutralise its first colon.
    }
    for (index, c) in original.iter().enumerate() {
        if colon_positions.contains(&index) {
            result.push_str("&#58;");
        } else {
            result.push(*c);
        }
    }
    result
}

/// What a variable may hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest value in bytes.
    pub max_bytes: usize,
}

/// Checks every variable under `policy`; returns the values to render (
/// escaped where the policy says so) or one violation per variable and
/// rule. `field` prefixes violation paths (e.g. `spec.variables`);
/// `limits` gives the declared variables (others are rejected).
pub fn check(
    variables: &BTreeMap<String, String>,
    limits: &BTreeMap<String, Limits>,
    policy: SanitizePolicy,
    field: &str,
    agent_type: &str,
) -> Result<BTreeMap<String, String>, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if variables.len() > MAX_VARIABLES {
        violations.push(FieldViolation::new(
            field,
            format!("{} entries", variables.len()),
            format!("must have at most {MAX_VARIABLES} entries"),
        ));
    }
    let total: usize = variables.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_TOTAL_BYTES {
        violations.push(FieldViolation::new(
            field,
            format!("{total} bytes"),
            format!("must total at most {MAX_TOTAL_BYTES} bytes"),
        ));
    }
    let mut cleaned = BTreeMap::new();
    for (name, value) in variables {
        let path = format!("{field}.{name}");
        let Some(limit) = limits.get(name) else {
            violations.push(FieldViolation::new(
                path,
                format!("{name:?}"),
                format!("is not a variable of agent {agent_type:?}"),
            ));
            continue;
        };
        let max_bytes = limit.max_bytes.min(MAX_VALUE_BYTES);
        if value.len() > max_bytes {
            violations.push(FieldViolation::new(
                path,
                format!("{} bytes", value.len()),
                format!("must be at most {max_bytes} bytes"),
            ));
            continue;
        }
        let broken = inspect(value);
        if broken.is_empty() {
            cleaned.insert(name.clone(), value.clone());
            continue;
        }
        match policy {
            SanitizePolicy::Reject => {
                for rule in broken {
                    violations.push(FieldViolation::new(&path, preview(value), rule));
                }
            }
            SanitizePolicy::Escape => {
                cleaned.insert(name.clone(), escape(value));
            }
        }
    }
    if violations.is_empty() {
        Ok(cleaned)
    } else {
        Err(violations)
    }
}

/// A short, printable preview of a rejected value for error messages.
fn preview(value: &str) -> String {
    let shown: String = value.chars().take(48).collect();
    let shown = format!("{shown:?}");
    if value.chars().count() > 48 {
        format!("{shown}…")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real-world payload variants (OWASP XSS filter evasion cheat sheet,
    /// PortSwigger XSS cheat sheet): case, whitespace, entities, nesting,
    /// encodings, attribute breakouts.
    const PAYLOADS: &[&str] = &[
        "<script>alert(1)</script>",
        "<SCRIPT>alert('XSS')</SCRIPT>",
        "<ScRiPt SRC=//evil.example/x.js></sCrIpT>",
        "< script >alert(1)</ script >",
        "<script\n>alert(1)</script>",
        "<scr<script>ipt>alert(1)</scr</script>ipt>",
        "</script><script>alert(1)</script>",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "&#60;script&#62;alert(1)&#60;/script&#62;",
        "&#x3C;script&#x3E;alert(1)",
        "&#0000060script&#0000062alert(1)",
        "%3Cscript%3Ealert(1)%3C/script%3E",
        "%253Cscript%253Ealert(1)",
        "\\x3cscript\\x3ealert(1)\\x3c/script\\x3e",
        "\\u003cscript\\u003ealert(1)",
        "<scr\u{0}ipt>alert(1)</script>",
        "<iframe src=//evil.example></iframe>",
        "<object data=evil.swf>",
        "<embed src=evil.swf>",
        "javascript:alert(1)",
        "JaVaScRiPt:alert(document.cookie)",
        "<a href=\"javascript:alert(1)\">x</a>",
        "<a href=\" javascript: alert(1)\">x</a>",
        "java\tscript:alert(1)",
        "jav&#x09;ascript:alert(1)",
        "jav&#x0A;ascript:alert(1)",
        "&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)",
        "&#x6A;&#x61;&#x76;&#x61;&#x73;&#x63;&#x72;&#x69;&#x70;&#x74;&#x3A;alert(1)",
        "javascript&colon;alert(1)",
        "javascript%3Aalert(1)",
        "[click](javascript:alert(1))",
        "vbscript:msgbox(1)",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "<img src=x onerror=alert(1)>",
        "<IMG SRC=x OnErRoR=alert(1)>",
        "<img src=x onerror\n=alert(1)>",
        "<svg onload=alert(1)>",
        "<svg/onload=alert(1)>",
        "<body onload=alert(1)>",
        "<div onmouseover=\"alert(1)\">hover</div>",
        "<details open ontoggle=alert(1)>",
        "\" onfocus=\"alert(1)\" autofocus=\"",
        "' onmouseover='alert(1)",
        "\"><img src=x onerror=alert(1)>",
        "&lt;img src=x onerror=alert(1)&gt;",
        "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
        "<input autofocus onfocus=alert(1)>",
        "x onerror=alert(1)",
        "<a href=x onclick =alert(1)>x</a>",
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        "text with a \u{202E} right-to-left override",
        "bell \u{7} character",
    ];

    /// Ordinary text that must pass unchanged.
    const ORDINARY: &[&str] = &[
        "Write a function that returns a < b && c > d.",
        "if (x < 10 && y > 3) { return x << 2; }",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "window.onload = init; // set the handler in code",
        "button.onclick = () => submit();",
        "The integral of x^2 from 0 to 1 is 1/3, and 2 < 3 > 1.",
        "Based on the report, focus on the online, ongoing and only one deployment.",
        "Turn the feature on = enabled; once done, move on.",
        "I like JavaScript: it is flexible. See the chapter on scripts.",
        "Use the <div> and <span> elements; keep <p> short.",
        "SELECT * FROM t WHERE a <> b AND c >= 5;",
        "Email me at dev@example.com or visit https://example.com/path?a=1&b=2",
        "Matrix:\n\t[1, 2]\n\t[3, 4]\r\n",
        "Résumé, naïve café, 日本語のテキスト, emoji 🚀",
        "The test ran on 2024-05-01; onboarding is next (one=1).",
        "Python: online = True\nprint(online)",
        "50% of users, 100%25 encoded",
    ];

    #[test]
    fn every_payload_is_flagged() {
        for payload in PAYLOADS {
            assert!(!inspect(payload).is_empty(), "not flagged: {payload:?}");
        }
    }

    #[test]
    fn ordinary_text_passes() {
        for text in ORDINARY {
            assert_eq!(inspect(text), Vec::<&str>::new(), "flagged: {text:?}");
        }
    }

    #[test]
    fn escaped_payloads_carry_no_live_markup() {
        for payload in PAYLOADS {
            let escaped = escape(payload);
            assert!(!escaped.contains('<'), "{escaped}");
            assert!(!escaped.contains('"'), "{escaped}");
            assert!(!escaped.chars().any(is_forbidden_char), "{escaped:?}");
            assert!(!escaped.to_lowercase().contains("javascript:"), "{escaped}");
        }
    }

    fn limits(names: &[&str]) -> BTreeMap<String, Limits> {
        names
            .iter()
            .map(|name| ((*name).to_owned(), Limits { max_bytes: 16 }))
            .collect()
    }

    #[test]
    fn reject_names_each_variable_and_rule() {
        let variables: BTreeMap<String, String> = [
            ("task", "<img src=x onerror=alert(1)>"),
            ("context", "fine"),
            ("extra", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let violations = check(
            &variables,
            &limits(&["task", "context"]),
            SanitizePolicy::Reject,
            "spec.variables",
            "coder",
        )
        .unwrap_err();
        let described: Vec<_> = violations
            .iter()
            .map(|v| (v.field.as_str(), v.rule.as_str()))
            .collect();
        assert_eq!(
            described,
            [
                (
                    "spec.variables.extra",
                    "is not a variable of agent \"coder\""
                ),
                ("spec.variables.task", "must be at most 16 bytes"),
            ]
        );
        let mut small = BTreeMap::new();
        small.insert("task".to_owned(), "<svg onload=x>".to_owned());
        let violations = check(
            &small,
            &limits(&["task"]),
            SanitizePolicy::Reject,
            "spec.variables",
            "coder",
        )
        .unwrap_err();
        let rules: Vec<_> = violations.iter().map(|v| v.rule.as_str()).collect();
        assert_eq!(rules, [RULE_EVENT_HANDLER]);
    }

    #[test]
    fn escape_policy_escapes_only_flagged_values() {
        let mut variables = BTreeMap::new();
        variables.insert("task".to_owned(), "<svg onload=x>".to_owned());
        variables.insert("context".to_owned(), "a < b".to_owned());
        let cleaned = check(
            &variables,
            &limits(&["task", "context"]),
            SanitizePolicy::Escape,
            "spec.variables",
            "coder",
        )
        .unwrap();
        assert_eq!(cleaned["task"], "&lt;svg onload=x&gt;");
        assert_eq!(cleaned["context"], "a < b");
    }
}
