//! Workflow definitions: the steps of a workflow (agent, variable
//! templates, dependencies, artifacts required and created, approval
//! gates, fallback), their validation (names, limits, a DAG without
//! cycles, every template reference resolvable), the built-in SDLC flow,
//! and YAML files from the definitions folder:
//!
//! ```yaml
//! name: review
//! description: Implement a change, then review it
//! inputs:
//!   - name: task
//!   - name: language
//!     default: Rust
//! steps:
//!   - name: implement
//!     agent_type: coder
//!     creates: source_code
//!     variables: { task: "{{ task }}", language: "{{ language }}" }
//!   - name: review
//!     agent_type: tester
//!     depends_on: [implement]
//!     approve_output: true
//!     variables: { task: "Review the change", code: "{{ source_code }}" }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use agentmesh_agent::sanitize::{MAX_VALUE_BYTES, MAX_VARIABLES};
use agentmesh_proto::common as common_pb;
use agentmesh_proto::gateway as pb;
use agentmesh_resilience::FieldViolation;
use serde::{Deserialize, Serialize};

/// Name of the built-in SDLC workflow.
pub const SDLC: &str = "sdlc";
/// The built-in SDLC workflow, in the YAML format of definition files.
pub const SDLC_YAML: &str = include_str!("sdlc.yaml");
/// Template variable that holds a reviewer's amendment.
pub const HITL_RESPONSE: &str = "hitl_response";
/// Context variable used when a step names none.
pub const DEFAULT_CONTEXT_VARIABLE: &str = "context";
/// Most entries in one step's `depends_on`, and in its `requires`.
pub const MAX_DEPENDENCIES: usize = 32;
/// Longest prompt template override.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// Longest YAML definition file.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Model parameter overrides of one step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Parameters {
    /// Model name.
    pub model: Option<String>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Provider call timeout in seconds.
    pub timeout_seconds: Option<i64>,
}

impl Parameters {
    fn from_wire(parameters: Option<common_pb::ModelParameters>) -> Self {
        let parameters = parameters.unwrap_or_default();
        Self {
            model: parameters.model,
            temperature: parameters.temperature,
            max_tokens: parameters.max_tokens,
            timeout_seconds: parameters.timeout_seconds,
        }
    }

    /// The wire form; `None` when nothing is overridden.
    pub fn to_wire(&self) -> Option<common_pb::ModelParameters> {
        (*self != Self::default()).then(|| common_pb::ModelParameters {
            model: self.model.clone(),
            temperature: self.temperature,
            max_tokens: self.max_tokens,
            timeout_seconds: self.timeout_seconds,
        })
    }
}

/// One step of a workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Unique name, 1 to 64 bytes of `[a-z0-9_-]`.
    pub name: String,
    /// Catalogue agent that runs it.
    #[serde(alias = "agent")]
    pub agent_type: String,
    /// Variable templates, rendered over inputs and artifacts.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Steps that must succeed first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Model parameter overrides.
    #[serde(default)]
    pub parameters: Parameters,
    /// Variable receiving the context (default `context`).
    #[serde(default)]
    pub context_variable: String,
    /// Prompt template override.
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// Artifacts the step needs.
    #[serde(default)]
    pub requires: Vec<String>,
    /// Artifact its output becomes (default: the step name, `-` → `_`).
    #[serde(default)]
    pub creates: String,
    /// Waits for approval before starting.
    #[serde(default)]
    pub approve_before_start: bool,
    /// Waits for approval of its output.
    #[serde(default)]
    pub approve_output: bool,
    /// May be answered by the fallback agent.
    #[serde(default)]
    pub allow_fallback: bool,
}

impl StepSpec {
    /// A step from the wire.
    pub fn from_wire(step: pb::WorkflowStep) -> Self {
        Self {
            name: step.name,
            agent_type: step.agent_type,
            variables: step.variables.into_iter().collect(),
            depends_on: step.depends_on,
            parameters: Parameters::from_wire(step.parameters),
            context_variable: step.context_variable,
            prompt_template: step.prompt_template,
            requires: step.requires,
            creates: step.creates,
            approve_before_start: step.approve_before_start,
            approve_output: step.approve_output,
            allow_fallback: step.allow_fallback,
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> pb::WorkflowStep {
        pb::WorkflowStep {
            name: self.name.clone(),
            agent_type: self.agent_type.clone(),
            variables: self.variables.clone().into_iter().collect(),
            depends_on: self.depends_on.clone(),
            parameters: self.parameters.to_wire(),
            context_variable: self.context_variable.clone(),
            prompt_template: self.prompt_template.clone(),
            requires: self.requires.clone(),
            creates: self.creates.clone(),
            approve_before_start: self.approve_before_start,
            approve_output: self.approve_output,
            allow_fallback: self.allow_fallback,
        }
    }
}

/// An input variable of a definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name used in templates.
    pub name: String,
    /// What it should contain.
    #[serde(default)]
    pub description: String,
    /// Value when the run gives none; `None` means required.
    #[serde(default)]
    pub default: Option<String>,
}

/// A named workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Name, 1 to 64 bytes of `[a-z0-9_-]`.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Inputs it reads.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Its steps.
    pub steps: Vec<StepSpec>,
}

/// Why definitions could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// A file or the folder could not be read.
    #[error("cannot read workflow definitions at {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a valid definition.
    #[error("workflow definition {path} is invalid: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Every broken rule.
        message: String,
    },
}

/// Names of steps and definitions: 1 to 64 bytes of `[a-z0-9_-]`.
pub fn is_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Whether a workflow is acyclic etc.: the limits that apply.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most steps.
    pub max_steps: usize,
}

/// Fills the defaults of `steps` (`creates`, `context_variable`) and checks
/// every rule: names, limits, dependencies (known, no cycle), artifacts
/// (created once, required ones reachable) and variable templates
/// (compile, and read only `inputs`, upstream artifacts or
/// `hitl_response`). `field` prefixes violation paths (`steps`).
pub fn validate_steps(
    steps: &mut [StepSpec],
    inputs: &BTreeSet<String>,
    limits: Limits,
    field: &str,
) -> Result<(), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if steps.is_empty() || steps.len() > limits.max_steps {
        return Err(vec![FieldViolation::new(
            field,
            format!("{} entries", steps.len()),
            format!("must have 1 to {} entries", limits.max_steps),
        )]);
    }
    let mut index_of = BTreeMap::new();
    let mut creators: BTreeMap<String, usize> = BTreeMap::new();
    for (index, step) in steps.iter_mut().enumerate() {
        let at = format!("{field}[{index}]");
        if !is_step_name(&step.name) {
            violations.push(FieldViolation::new(
                format!("{at}.name"),
                format!("{:?}", step.name),
                "must be 1 to 64 bytes of [a-z0-9_-]",
            ));
        } else if index_of.insert(step.name.clone(), index).is_some() {
            violations.push(FieldViolation::new(
                format!("{at}.name"),
                format!("{:?}", step.name),
                "must be unique in the workflow",
            ));
        }
        if !agentmesh_agent::catalogue::is_name(&step.agent_type) {
            violations.push(FieldViolation::new(
                format!("{at}.agent_type"),
                format!("{:?}", step.agent_type),
                "must be 1 to 64 bytes of [a-z0-9_], starting with a letter",
            ));
        }
        if step.creates.is_empty() {
            step.creates = step.name.replace('-', "_");
        }
        if !agentmesh_agent::catalogue::is_name(&step.creates) || step.creates == HITL_RESPONSE {
            violations.push(FieldViolation::new(
                format!("{at}.creates"),
                format!("{:?}", step.creates),
                "must be 1 to 64 bytes of [a-z0-9_] starting with a letter, and not hitl_response",
            ));
        } else if inputs.contains(&step.creates) {
            violations.push(FieldViolation::new(
                format!("{at}.creates"),
                format!("{:?}", step.creates),
                "must not be the name of a run input",
            ));
        } else if let Some(first) = creators.insert(step.creates.clone(), index) {
            violations.push(FieldViolation::new(
                format!("{at}.creates"),
                format!("{:?}", step.creates),
                format!("is already created by {field}[{first}]"),
            ));
        }
        if step.context_variable.is_empty() {
            DEFAULT_CONTEXT_VARIABLE.clone_into(&mut step.context_variable);
        }
        if !agentmesh_agent::catalogue::is_name(&step.context_variable) {
            violations.push(FieldViolation::new(
                format!("{at}.context_variable"),
                format!("{:?}", step.context_variable),
                "must be 1 to 64 bytes of [a-z0-9_], starting with a letter",
            ));
        }
        for (what, count) in [
            ("depends_on", step.depends_on.len()),
            ("requires", step.requires.len()),
        ] {
            if count > MAX_DEPENDENCIES {
                violations.push(FieldViolation::new(
                    format!("{at}.{what}"),
                    format!("{count} entries"),
                    format!("must have at most {MAX_DEPENDENCIES} entries"),
                ));
            }
        }
        if step.variables.len() > MAX_VARIABLES {
            violations.push(FieldViolation::new(
                format!("{at}.variables"),
                format!("{} entries", step.variables.len()),
                format!("must have at most {MAX_VARIABLES} entries"),
            ));
        }
        if let Some(template) = &step.prompt_template {
            if template.len() > MAX_TEMPLATE_BYTES {
                violations.push(FieldViolation::new(
                    format!("{at}.prompt_template"),
                    format!("{} bytes", template.len()),
                    format!("must be at most {MAX_TEMPLATE_BYTES} bytes"),
                ));
            } else if let Err(error) = agentmesh_agent::template::referenced_variables(template) {
                violations.push(FieldViolation::new(
                    format!("{at}.prompt_template"),
                    "template",
                    format!("must be a valid template: {error}"),
                ));
            }
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    // Dependencies name other steps, once each.
    for (index, step) in steps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (position, dependency) in step.depends_on.iter().enumerate() {
            let path = format!("{field}[{index}].depends_on[{position}]");
            if dependency == &step.name {
                violations.push(FieldViolation::new(
                    path,
                    format!("{dependency:?}"),
                    "must not name the step itself",
                ));
            } else if !index_of.contains_key(dependency) {
                violations.push(FieldViolation::new(
                    path,
                    format!("{dependency:?}"),
                    "names no step of the workflow",
                ));
            } else if !seen.insert(dependency) {
                violations.push(FieldViolation::new(
                    path,
                    format!("{dependency:?}"),
                    "is listed twice",
                ));
            }
        }
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    if let Some(cycle) = find_cycle(steps, &index_of) {
        let first = index_of.get(&cycle[0]).copied().unwrap_or(0);
        return Err(vec![FieldViolation::new(
            format!("{field}[{first}].depends_on"),
            cycle.join(" -> "),
            "must not form a cycle",
        )]);
    }
    // What each step can read: inputs, upstream artifacts, the amendment.
    let upstream = upstream_sets(steps, &index_of);
    for (index, step) in steps.iter().enumerate() {
        let mut readable: BTreeSet<&str> = inputs.iter().map(String::as_str).collect();
        readable.insert(HITL_RESPONSE);
        for &other in &upstream[index] {
            readable.insert(steps[other].creates.as_str());
        }
        for (position, required) in step.requires.iter().enumerate() {
            if !readable.contains(required.as_str()) || required == HITL_RESPONSE {
                violations.push(FieldViolation::new(
                    format!("{field}[{index}].requires[{position}]"),
                    format!("{required:?}"),
                    "must be a run input or the artifact of a step this one depends on",
                ));
            }
        }
        for (name, template) in &step.variables {
            let path = format!("{field}[{index}].variables.{name}");
            if template.len() > MAX_VALUE_BYTES {
                violations.push(FieldViolation::new(
                    path,
                    format!("{} bytes", template.len()),
                    format!("must be at most {MAX_VALUE_BYTES} bytes"),
                ));
                continue;
            }
            match agentmesh_agent::template::referenced_variables(template) {
                Err(error) => violations.push(FieldViolation::new(
                    path,
                    "template",
                    format!("must be a valid template: {error}"),
                )),
                Ok(names) => {
                    for unknown in names.iter().filter(|n| !readable.contains(n.as_str())) {
                        violations.push(FieldViolation::new(
                            path.clone(),
                            format!("{{{{ {unknown} }}}}"),
                            "must read only run inputs, artifacts of steps this one depends on, or hitl_response",
                        ));
                    }
                }
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// The first cycle among the steps' dependencies, as step names with the
/// first repeated at the end (`a -> b -> a`).
fn find_cycle(steps: &[StepSpec], index_of: &BTreeMap<String, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; steps.len()];
    for start in 0..steps.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative depth-first search: (step, next dependency to visit).
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            let Some(dependency) = steps[node].depends_on.get(*next) else {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            let Some(&target) = index_of.get(dependency) else {
                continue;
            };
            match marks[target] {
                Mark::New => {
                    marks[target] = Mark::OnPath;
                    path.push((target, 0));
                }
                Mark::OnPath => {
                    let from = path.iter().position(|&(n, _)| n == target).unwrap_or(0);
                    // The path follows "depends on" edges; a cycle reads
                    // better in execution order, so it is reversed.
                    let mut cycle: Vec<usize> = path[from..].iter().map(|&(n, _)| n).collect();
                    cycle.reverse();
                    // Start at the step declared first, so the message is stable.
                    let first = cycle
                        .iter()
                        .enumerate()
                        .min_by_key(|&(_, &n)| n)
                        .map_or(0, |(position, _)| position);
                    cycle.rotate_left(first);
                    cycle.push(cycle[0]);
                    return Some(cycle.into_iter().map(|n| steps[n].name.clone()).collect());
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// For each step, every step it depends on directly or not (acyclic input).
fn upstream_sets(steps: &[StepSpec], index_of: &BTreeMap<String, usize>) -> Vec<BTreeSet<usize>> {
    let mut sets: Vec<Option<BTreeSet<usize>>> = vec![None; steps.len()];
    fn visit(
        node: usize,
        steps: &[StepSpec],
        index_of: &BTreeMap<String, usize>,
        sets: &mut Vec<Option<BTreeSet<usize>>>,
    ) -> BTreeSet<usize> {
        if let Some(done) = &sets[node] {
            return done.clone();
        }
        let mut all = BTreeSet::new();
        for dependency in &steps[node].depends_on {
            if let Some(&target) = index_of.get(dependency) {
                all.insert(target);
                all.extend(visit(target, steps, index_of, sets));
            }
        }
        sets[node] = Some(all.clone());
        all
    }
    (0..steps.len())
        .map(|node| visit(node, steps, index_of, &mut sets))
        .collect()
}

/// Checks a definition's own fields and its steps.
pub fn validate_definition(
    definition: &mut Definition,
    limits: Limits,
) -> Result<(), Vec<FieldViolation>> {
    let mut violations = Vec::new();
    if !is_step_name(&definition.name) {
        violations.push(FieldViolation::new(
            "name",
            format!("{:?}", definition.name),
            "must be 1 to 64 bytes of [a-z0-9_-]",
        ));
    }
    let mut inputs = BTreeSet::new();
    for (index, input) in definition.inputs.iter().enumerate() {
        if !agentmesh_agent::catalogue::is_name(&input.name) || input.name == HITL_RESPONSE {
            violations.push(FieldViolation::new(
                format!("inputs[{index}].name"),
                format!("{:?}", input.name),
                "must be 1 to 64 bytes of [a-z0-9_] starting with a letter, and not hitl_response",
            ));
        } else if !inputs.insert(input.name.clone()) {
            violations.push(FieldViolation::new(
                format!("inputs[{index}].name"),
                format!("{:?}", input.name),
                "must be unique",
            ));
        }
    }
    if let Err(more) = validate_steps(&mut definition.steps, &inputs, limits, "steps") {
        violations.extend(more);
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Parses and validates one definition from YAML; `path` names it in
/// errors.
pub fn parse(yaml: &str, path: &str, limits: Limits) -> Result<Definition, DefinitionError> {
    let mut definition: Definition =
        serde_saphyr::from_str(yaml).map_err(|error| DefinitionError::Invalid {
            path: path.to_owned(),
            message: error.to_string().replace('\n', " "),
        })?;
    validate_definition(&mut definition, limits).map_err(|violations| {
        DefinitionError::Invalid {
            path: path.to_owned(),
            message: violations
                .iter()
                .map(|v| format!("{} = {}: {}", v.field, v.value, v.rule))
                .collect::<Vec<_>>()
                .join("; "),
        }
    })?;
    Ok(definition)
}

/// A definition and where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The definition, validated, defaults filled.
    pub definition: Definition,
    /// `builtin` or the file's path.
    pub source: String,
}

/// Every definition that can be run by name.
#[derive(Clone, Debug, Default)]
pub struct Definitions {
    by_name: BTreeMap<String, Loaded>,
}

impl Definitions {
    /// The built-in SDLC flow plus every `*.yaml` / `*.yml` in `dir` (a
    /// missing folder holds none); a file may replace the built-in by
    /// using its name, two files may not share one.
    pub fn load(dir: &Path, limits: Limits) -> Result<Self, DefinitionError> {
        let mut by_name = BTreeMap::new();
        let builtin = parse(SDLC_YAML, "builtin:sdlc", limits)?;
        by_name.insert(
            builtin.name.clone(),
            Loaded {
                definition: builtin,
                source: "builtin".to_owned(),
            },
        );
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self { by_name });
            }
            Err(source) => {
                return Err(DefinitionError::Read {
                    path: dir.display().to_string(),
                    source,
                });
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|source| DefinitionError::Read {
                    path: dir.display().to_string(),
                    source,
                })?
                .path();
            if path.is_file()
                && path
                    .extension()
                    .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                files.push(path);
            }
        }
        files.sort();
        let mut from_files = BTreeSet::new();
        for path in files {
            let shown = path.display().to_string();
            let read_error = |source| DefinitionError::Read {
                path: shown.clone(),
                source,
            };
            let size = std::fs::metadata(&path).map_err(read_error)?.len();
            if size > MAX_FILE_BYTES {
                return Err(DefinitionError::Invalid {
                    path: shown,
                    message: format!("{size} bytes: must be at most {MAX_FILE_BYTES} bytes"),
                });
            }
            let text = std::fs::read_to_string(&path).map_err(read_error)?;
            let definition = parse(&text, &shown, limits)?;
            if !from_files.insert(definition.name.clone()) {
                return Err(DefinitionError::Invalid {
                    path: shown,
                    message: format!(
                        "name = {:?}: another file already defines it",
                        definition.name
                    ),
                });
            }
            tracing::info!(
                workflow = definition.name,
                file = shown,
                steps = definition.steps.len(),
                "workflow definition loaded"
            );
            by_name.insert(
                definition.name.clone(),
                Loaded {
                    definition,
                    source: shown,
                },
            );
        }
        Ok(Self { by_name })
    }

    /// One definition.
    pub fn get(&self, name: &str) -> Option<&Loaded> {
        self.by_name.get(name)
    }

    /// Every definition, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Loaded> {
        self.by_name.values()
    }
}

impl Loaded {
    /// The wire form.
    pub fn to_wire(&self) -> pb::WorkflowDefinition {
        pb::WorkflowDefinition {
            name: self.definition.name.clone(),
            description: self.definition.description.clone(),
            source: self.source.clone(),
            inputs: self
                .definition
                .inputs
                .iter()
                .map(|input| pb::WorkflowInput {
                    name: input.name.clone(),
                    description: input.description.clone(),
                    default_value: input.default.clone(),
                })
                .collect(),
            steps: self
                .definition
                .steps
                .iter()
                .map(StepSpec::to_wire)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_steps: 32 };

    fn step(name: &str, depends_on: &[&str]) -> StepSpec {
        StepSpec {
            name: name.to_owned(),
            agent_type: "coder".to_owned(),
            variables: BTreeMap::new(),
            depends_on: depends_on.iter().map(|d| (*d).to_owned()).collect(),
            parameters: Parameters::default(),
            context_variable: String::new(),
            prompt_template: None,
            requires: Vec::new(),
            creates: String::new(),
            approve_before_start: false,
            approve_output: false,
            allow_fallback: false,
        }
    }

    #[test]
    fn the_builtin_sdlc_flow_is_valid() {
        let definitions = Definitions::load(Path::new("/nonexistent"), LIMITS).unwrap();
        let sdlc = &definitions.get(SDLC).unwrap().definition;
        let agents: Vec<&str> = sdlc.steps.iter().map(|s| s.agent_type.as_str()).collect();
        assert_eq!(
            agents,
            [
                "orchestrator",
                "analyst",
                "architect",
                "coder",
                "tester",
                "deployer"
            ]
        );
        assert!(sdlc.steps.iter().all(|s| s.context_variable == "context"));
        assert!(sdlc.steps[5].approve_before_start);
    }

    #[test]
    fn cycles_are_named_in_execution_order() {
        let mut steps = vec![
            step("a", &["c"]),
            step("b", &["a"]),
            step("c", &["b"]),
            step("d", &[]),
        ];
        let violations = validate_steps(&mut steps, &BTreeSet::new(), LIMITS, "steps").unwrap_err();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "steps[0].depends_on");
        assert_eq!(violations[0].value, "a -> b -> c -> a");
        assert_eq!(violations[0].rule, "must not form a cycle");
    }

    #[test]
    fn unknown_and_self_dependencies_and_bad_names_are_refused() {
        let mut steps = vec![step("a", &["nope"]), step("b", &["b"])];
        let violations = validate_steps(&mut steps, &BTreeSet::new(), LIMITS, "steps").unwrap_err();
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["steps[0].depends_on[0]", "steps[1].depends_on[0]"]);
        assert_eq!(violations[0].rule, "names no step of the workflow");

        let mut steps = vec![step("A", &[]), step("a", &[]), step("a", &[])];
        let violations = validate_steps(&mut steps, &BTreeSet::new(), LIMITS, "steps").unwrap_err();
        assert_eq!(violations[0].field, "steps[0].name");
        assert!(
            violations
                .iter()
                .any(|v| v.rule == "must be unique in the workflow")
        );

        let mut too_many: Vec<StepSpec> = (0..3).map(|i| step(&format!("s{i}"), &[])).collect();
        let violations = validate_steps(
            &mut too_many,
            &BTreeSet::new(),
            Limits { max_steps: 2 },
            "steps",
        )
        .unwrap_err();
        assert_eq!(violations[0].rule, "must have 1 to 2 entries");
    }

    #[test]
    fn templates_may_read_inputs_and_upstream_artifacts_only() {
        let mut first = step("first-step", &[]);
        first.variables.insert("task".into(), "{{ goal }}".into());
        let mut second = step("second", &["first-step"]);
        second
            .variables
            .insert("task".into(), "{{ first_step }} {{ hitl_response }}".into());
        let mut third = step("third", &[]);
        third
            .variables
            .insert("task".into(), "{{ first_step }}".into());
        third.requires.push("second".into());
        let inputs: BTreeSet<String> = ["goal".to_owned()].into();
        let violations =
            validate_steps(&mut [first, second, third], &inputs, LIMITS, "steps").unwrap_err();
        let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["steps[2].requires[0]", "steps[2].variables.task"]);
        assert_eq!(violations[1].value, "{{ first_step }}");
    }

    #[test]
    fn yaml_files_load_and_bad_ones_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("review.yaml"),
            "name: review\ninputs:\n  - name: task\nsteps:\n  - name: implement\n    agent: coder\n    variables: { task: \"{{ task }}\" }\n  - name: check\n    agent_type: tester\n    depends_on: [implement]\n    approve_output: true\n    variables: { task: x, code: \"{{ implement }}\" }\n",
        )
        .unwrap();
        let definitions = Definitions::load(dir.path(), LIMITS).unwrap();
        let review = definitions.get("review").unwrap();
        assert_eq!(review.definition.steps[0].creates, "implement");
        assert!(review.definition.steps[1].approve_output);
        assert!(review.source.ends_with("review.yaml"));
        assert!(definitions.get(SDLC).is_some());

        std::fs::write(
            dir.path().join("zz-bad.yml"),
            "name: bad\nsteps:\n  - name: a\n    agent_type: coder\n    depends_on: [b]\n  - name: b\n    agent_type: coder\n    depends_on: [a]\n",
        )
        .unwrap();
        let error = Definitions::load(dir.path(), LIMITS)
            .unwrap_err()
            .to_string();
        assert!(error.contains("zz-bad.yml"), "{error}");
        assert!(error.contains("a -> b -> a"), "{error}");

        std::fs::write(dir.path().join("zz-bad.yml"), "name: bad\nstepz: []\n").unwrap();
        let error = Definitions::load(dir.path(), LIMITS)
            .unwrap_err()
            .to_string();
        assert!(error.contains("stepz"), "{error}");
    }

    #[test]
    fn the_readme_example_is_a_valid_definition() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
                .unwrap();
        let start = readme.find("# <data_dir>/workflows/review.yaml").unwrap();
        let end = start + readme[start..].find("```").unwrap();
        let definition = parse(&readme[start..end], "README.md", LIMITS).unwrap();
        assert_eq!(definition.name, "review");
        assert_eq!(definition.steps[1].requires, ["source_code"]);
        assert!(definition.steps[1].approve_output && definition.steps[1].allow_fallback);
    }
}
