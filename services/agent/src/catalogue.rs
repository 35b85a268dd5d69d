//! The agent catalogue: the six built-in agent types of the design note
//! (orchestrator, analyst, architect, coder, tester, deployer), each with a
//! role, a system prompt and a prompt template with declared variables,
//! extended or overridden from a TOML file in the data dir
//! (`agent_service.catalogue_file`, default `<data_dir>/agents.toml`):
//!
//! ```toml
//! [[agents]]
//! agent_type = "reviewer"
//! description = "Reviews a change"
//! system_prompt = "You are a careful code reviewer."
//! prompt_template = "Review this change:\n{{ diff }}"
//! [[agents.variables]]
//! name = "diff"
//! description = "The unified diff"
//! required = true
//! max_bytes = 32768
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::sanitize::{Limits, MAX_VALUE_BYTES};

/// A variable a template declares.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariableSpec {
    /// Name used in the template.
    pub name: String,
    /// What it should contain.
    #[serde(default)]
    pub description: String,
    /// Whether a value must be given (when there is no default).
    #[serde(default)]
    pub required: bool,
    /// Value used when none is given.
    #[serde(default)]
    pub default_value: Option<String>,
    /// Longest value in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
}

fn default_max_bytes() -> usize {
    MAX_VALUE_BYTES
}

/// One agent type.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Type name, e.g. `coder`.
    pub agent_type: String,
    /// Its role.
    pub description: String,
    /// System prompt sent before the rendered template.
    pub system_prompt: String,
    /// The template (minijinja syntax).
    pub prompt_template: String,
    /// Declared variables.
    #[serde(default)]
    pub variables: Vec<VariableSpec>,
}

impl AgentSpec {
    /// Size limits of the declared variables, by name.
    pub fn limits(&self) -> BTreeMap<String, Limits> {
        self.variables
            .iter()
            .map(|variable| {
                (
                    variable.name.clone(),
                    Limits {
                        max_bytes: variable.max_bytes,
                    },
                )
            })
            .collect()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    #[serde(default)]
    agents: Vec<AgentSpec>,
}

/// Why the catalogue file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// Unreadable file.
    #[error("cannot read the agent catalogue {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape.
    #[error("agent catalogue {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// An entry breaks a rule.
    #[error("agent catalogue entry {agent_type:?}: {message}")]
    Entry {
        /// The agent type.
        agent_type: String,
        /// Which rule.
        message: String,
    },
}

/// Names of agent types and variables: 1 to 64 bytes of `[a-z0-9_]`,
/// starting with a letter.
pub fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_lowercase())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The agent types a node serves.
#[derive(Clone, Debug)]
pub struct Catalogue {
    agents: BTreeMap<String, AgentSpec>,
}

fn variable(name: &str, description: &str, default_value: Option<&str>) -> VariableSpec {
    VariableSpec {
        name: name.to_owned(),
        description: description.to_owned(),
        required: default_value.is_none(),
        default_value: default_value.map(str::to_owned),
        max_bytes: MAX_VALUE_BYTES,
    }
}

fn builtin(
    agent_type: &str,
    description: &str,
    system_prompt: &str,
    body: &str,
    extra: VariableSpec,
) -> AgentSpec {
    let extra_name = extra.name.clone();
    AgentSpec {
        agent_type: agent_type.to_owned(),
        description: description.to_owned(),
        system_prompt: system_prompt.to_owned(),
        prompt_template: format!(
            "{body}\n\nTask:\n{{{{ task }}}}\n{{% if {extra_name} %}}\n{}:\n{{{{ {extra_name} }}}}\n{{% endif %}}{{% if context %}}\nContext:\n{{{{ context }}}}\n{{% endif %}}",
            capitalise(&extra_name.replace('_', " "))
        ),
        variables: vec![
            variable("task", "What the agent should do", None),
            variable(
                "context",
                "Shared context: earlier outputs, artifacts, constraints",
                Some(""),
            ),
            extra,
        ],
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

impl Catalogue {
    /// The six built-in agent types.
    pub fn builtin() -> Self {
        let agents = [
            builtin(
                "orchestrator",
                "Breaks a goal into steps and assigns each to the right agent",
                "You are the orchestrator of a team of software agents. Plan the work as numbered steps, name the agent for each step and the artifacts it needs and produces.",
                "Plan how the team should reach this goal.",
                variable(
                    "agents",
                    "Agents available to the plan",
                    Some("analyst, architect, coder, tester, deployer"),
                ),
            ),
            builtin(
                "analyst",
                "Turns a request into a precise software specification",
                "You are a requirements analyst. Produce a precise specification: goals, non-goals, functional and non-functional requirements, open questions.",
                "Analyse this request and write its specification.",
                variable("requirements", "Known requirements or user input", Some("")),
            ),
            builtin(
                "architect",
                "Designs the system architecture for a specification",
                "You are a software architect. Propose components, interfaces, data flows and trade-offs; justify each decision briefly.",
                "Design the architecture for this task.",
                variable("constraints", "Technical constraints", Some("")),
            ),
            builtin(
                "coder",
                "Writes source code that implements a plan",
                "You are a senior software engineer. Write correct, idiomatic, tested code with short explanations.",
                "Implement this task.",
                variable("language", "Programming language", Some("")),
            ),
            builtin(
                "tester",
                "Writes and evaluates tests for code",
                "You are a test engineer. Write focused tests covering normal cases, edge cases and failures, and report what they show.",
                "Test this task.",
                variable("code", "The code under test", Some("")),
            ),
            builtin(
                "deployer",
                "Plans and checks a deployment",
                "You are a release engineer. Produce a safe deployment plan with checks, rollout steps and a rollback plan.",
                "Plan the deployment for this task.",
                variable("environment", "Target environment", Some("")),
            ),
        ];
        Self {
            agents: agents
                .into_iter()
                .map(|agent| (agent.agent_type.clone(), agent))
                .collect(),
        }
    }

    /// The built-in agents extended by `file` (when given) or by
    /// `<data_dir>/agents.toml` (when present); file entries replace
    /// built-ins of the same type.
    pub fn load(file: Option<&Path>, data_dir: &Path) -> Result<Self, CatalogueError> {
        let mut catalogue = Self::builtin();
        let path: PathBuf = match file {
            Some(path) => path.to_path_buf(),
            None => {
                let default = data_dir.join("agents.toml");
                if !default.is_file() {
                    return Ok(catalogue);
                }
                default
            }
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| CatalogueError::Read {
            path: shown.clone(),
            source,
        })?;
        let parsed: CatalogueFile =
            toml::from_str(&text).map_err(|error| CatalogueError::Parse {
                path: shown.clone(),
                message: error.to_string().replace('\n', " "),
            })?;
        for agent in parsed.agents {
            validate_entry(&agent)?;
            tracing::info!(
                agent_type = agent.agent_type,
                file = shown,
                "agent type loaded"
            );
            catalogue.agents.insert(agent.agent_type.clone(), agent);
        }
        Ok(catalogue)
    }

    /// One agent type.
    pub fn get(&self, agent_type: &str) -> Option<&AgentSpec> {
        self.agents.get(agent_type)
    }

    /// Every agent type, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &AgentSpec> {
        self.agents.values()
    }
}

fn validate_entry(agent: &AgentSpec) -> Result<(), CatalogueError> {
    let fail = |message: String| CatalogueError::Entry {
        agent_type: agent.agent_type.clone(),
        message,
    };
    if !is_name(&agent.agent_type) {
        return Err(fail(
            "agent_type must be 1 to 64 bytes of [a-z0-9_], starting with a letter".into(),
        ));
    }
    if agent.description.len() > 1024 {
        return Err(fail("description must be at most 1024 bytes".into()));
    }
    for (what, text) in [
        ("system_prompt", &agent.system_prompt),
        ("prompt_template", &agent.prompt_template),
    ] {
        if text.len() > 64 * 1024 {
            return Err(fail(format!("{what} must be at most 65536 bytes")));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for variable in &agent.variables {
        if !is_name(&variable.name) {
            return Err(fail(format!(
                "variable {:?}: name must be 1 to 64 bytes of [a-z0-9_], starting with a letter",
                variable.name
            )));
        }
        if !seen.insert(variable.name.as_str()) {
            return Err(fail(format!(
                "variable {:?} is declared twice",
                variable.name
            )));
        }
        if variable.max_bytes == 0 || variable.max_bytes > MAX_VALUE_BYTES {
            return Err(fail(format!(
                "variable {:?}: max_bytes must be between 1 and {MAX_VALUE_BYTES}",
                variable.name
            )));
        }
    }
    let referenced = crate::template::referenced_variables(&agent.prompt_template)
        .map_err(|error| fail(format!("prompt_template does not compile: {error}")))?;
    for name in referenced {
        if !seen.contains(name.as_str()) {
            return Err(fail(format!(
                "prompt_template uses {name:?}, which is not declared in variables"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_sorted() {
        let catalogue = Catalogue::builtin();
        let names: Vec<_> = catalogue.iter().map(|a| a.agent_type.as_str()).collect();
        assert_eq!(
            names,
            [
                "analyst",
                "architect",
                "coder",
                "deployer",
                "orchestrator",
                "tester"
            ]
        );
        for agent in catalogue.iter() {
            validate_entry(agent).unwrap();
        }
    }

    #[test]
    fn file_adds_and_replaces_and_refuses_bad_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("agents.toml"),
            r#"
[[agents]]
agent_type = "reviewer"
description = "Reviews a change"
system_prompt = "You review."
prompt_template = "Review:\n{{ diff }}"
[[agents.variables]]
name = "diff"
required = true
max_bytes = 1000
"#,
        )
        .unwrap();
        let catalogue = Catalogue::load(None, dir.path()).unwrap();
        assert_eq!(
            catalogue.get("reviewer").unwrap().variables[0].max_bytes,
            1000
        );
        assert!(catalogue.get("coder").is_some());

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[agents]]\nagent_type = \"x\"\ndescription = \"d\"\nsystem_prompt = \"s\"\nprompt_template = \"{{ undeclared }}\"\n",
        )
        .unwrap();
        let error = Catalogue::load(Some(&bad), dir.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("undeclared"), "{error}");
    }
}
