//! Prompt rendering with minijinja in strict mode: a template may only use
//! variables that have a value, every value is inserted as data (never
//! parsed as template syntax), output is not HTML-escaped (prompts are
//! plain text; the sanitiser decides about markup), and rendering has a
//! fuel budget so a template override cannot loop for long.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use agentmesh_resilience::FieldViolation;
use minijinja::{Environment, UndefinedBehavior};

/// Instructions a render may execute.
const FUEL: u64 = 200_000;
/// Longest rendered prompt, in bytes.
pub const MAX_RENDERED_BYTES: usize = 1024 * 1024;

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_fuel(Some(FUEL));
    env.set_keep_trailing_newline(true);
    env
}

/// The variables a template reads.
pub fn referenced_variables(source: &str) -> Result<BTreeSet<String>, minijinja::Error> {
    let env = environment();
    let template = env.template_from_str(source)?;
    Ok(variables_of(&env, &template))
}

/// Names a template reads that are not the engine's globals (`range`…).
fn variables_of(env: &Environment<'_>, template: &minijinja::Template<'_, '_>) -> BTreeSet<String> {
    let globals: BTreeSet<&str> = env.globals().map(|(name, _)| name).collect();
    template
        .undeclared_variables(false)
        .into_iter()
        .filter(|name| !globals.contains(name.as_str()))
        .collect()
}

/// Most catalogue templates kept compiled; beyond, templates compile per call.
const MAX_COMPILED_TEMPLATES: usize = 256;

/// A catalogue template compiled once: its environment (holding the
/// template as "t") and the variables it reads.
struct Compiled {
    env: Environment<'static>,
    variables: BTreeSet<String>,
}

/// Compiled catalogue templates by source text. Lexing and parsing showed
/// in profiles of every execution; the catalogue is fixed at start-up, so
/// its few sources are compiled once (and their text kept for the process).
fn compiled_catalogue_template(source: &str) -> Option<Arc<Compiled>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Compiled>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut entries = cache.lock().ok()?;
    if let Some(compiled) = entries.get(source) {
        return Some(Arc::clone(compiled));
    }
    if entries.len() >= MAX_COMPILED_TEMPLATES {
        return None;
    }
    let leaked: &'static str = Box::leak(source.to_owned().into_boxed_str());
    let mut env = environment();
    env.add_template("t", leaked).ok()?;
    let variables = variables_of(&env, &env.get_template("t").ok()?);
    let compiled = Arc::new(Compiled { env, variables });
    entries.insert(source.to_owned(), Arc::clone(&compiled));
    Some(compiled)
}

/// Renders a catalogue template (compiled once per process) with `values`;
/// arguments as in [`render`].
pub fn render_catalogue(
    source: &str,
    values: &BTreeMap<String, String>,
    field: &str,
    variables_field: &str,
) -> Result<String, Vec<FieldViolation>> {
    let Some(compiled) = compiled_catalogue_template(source) else {
        return render(source, values, field, variables_field);
    };
    let template = compiled.env.get_template("t").map_err(|error| {
        vec![FieldViolation::new(
            field,
            "template",
            format!("must be a valid template: {error}"),
        )]
    })?;
    finish_render(
        &template,
        &compiled.variables,
        values,
        field,
        variables_field,
    )
}

/// Renders `source` with `values`; `field` names the template in errors
/// (e.g. `spec.template_override`) and `variables_field` the variables.
pub fn render(
    source: &str,
    values: &BTreeMap<String, String>,
    field: &str,
    variables_field: &str,
) -> Result<String, Vec<FieldViolation>> {
    let env = environment();
    let template = env.template_from_str(source).map_err(|error| {
        vec![FieldViolation::new(
            field,
            "template",
            format!("must be a valid template: {error}"),
        )]
    })?;
    let variables = variables_of(&env, &template);
    finish_render(&template, &variables, values, field, variables_field)
}

fn finish_render(
    template: &minijinja::Template<'_, '_>,
    variables: &BTreeSet<String>,
    values: &BTreeMap<String, String>,
    field: &str,
    variables_field: &str,
) -> Result<String, Vec<FieldViolation>> {
    let missing: Vec<FieldViolation> = variables
        .iter()
        .filter(|name| !values.contains_key(name.as_str()))
        .map(|name| {
            FieldViolation::new(
                format!("{variables_field}.{name}"),
                "missing",
                "is required by the template",
            )
        })
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
    let rendered = template.render(values).map_err(|error| {
        let rule = if error.kind() == minijinja::ErrorKind::OutOfFuel {
            "must render within the template budget (too many loop iterations)".to_owned()
        } else {
            format!("must render: {error}")
        };
        vec![FieldViolation::new(field, "template", rule)]
    })?;
    if rendered.len() > MAX_RENDERED_BYTES {
        return Err(vec![FieldViolation::new(
            field,
            format!("{} bytes rendered", rendered.len()),
            format!("must render to at most {MAX_RENDERED_BYTES} bytes"),
        )]);
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn renders_values_as_data() {
        let rendered = render(
            "Task: {{ task }}",
            &values(&[("task", "{{ secret }} {% raw %}")]),
            "t",
            "v",
        )
        .unwrap();
        assert_eq!(rendered, "Task: {{ secret }} {% raw %}");
    }

    #[test]
    fn missing_variables_are_named() {
        let violations = render(
            "{{ a }} {{ b }} {{ c }}",
            &values(&[("b", "x")]),
            "t",
            "spec.variables",
        )
        .unwrap_err();
        let fields: Vec<_> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["spec.variables.a", "spec.variables.c"]);
    }

    #[test]
    fn syntax_errors_and_runaway_loops_are_rejected() {
        let violations =
            render("{{ unclosed", &values(&[]), "spec.template_override", "v").unwrap_err();
        assert_eq!(violations[0].field, "spec.template_override");
        let violations = render(
            "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
            &values(&[]),
            "spec.template_override",
            "v",
        )
        .unwrap_err();
        assert!(
            violations[0].rule.contains("budget"),
            "{}",
            violations[0].rule
        );
    }

    #[test]
    fn no_html_escaping() {
        assert_eq!(
            render("{{ a }}", &values(&[("a", "a < b")]), "t", "v").unwrap(),
            "a < b"
        );
    }

    #[test]
    fn catalogue_templates_render_like_uncached_ones_and_report_missing_variables() {
        let source = "Task: {{ task }} for {{ project }}";
        let filled = values(&[("task", "add"), ("project", "p1")]);
        let first = render_catalogue(source, &filled, "agent template", "spec.variables").unwrap();
        let again = render_catalogue(source, &filled, "agent template", "spec.variables").unwrap();
        assert_eq!(first, "Task: add for p1");
        assert_eq!(again, first);
        assert_eq!(render(source, &filled, "t", "v").unwrap(), first);
        let violations = render_catalogue(
            source,
            &values(&[("task", "add")]),
            "agent template",
            "spec.variables",
        )
        .unwrap_err();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "spec.variables.project");
    }
}
