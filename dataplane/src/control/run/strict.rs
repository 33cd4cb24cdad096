//! Strict mTLS (`dataplane.dev/mtls=strict`): the served pods' strict
//! tables kept as their namespaces want them (see
//! [`crate::control::return_path::strict_ruleset`]).
use std::collections::HashMap;

use super::Control;
use crate::cluster::model;

impl Control {
    /// Keeps the strict tables as the served pods' namespaces want them
    /// (`dataplane.dev/mtls=strict`): installed in those pods, removed from
    /// pods no longer served or no longer strict. Changes go to the
    /// return-path thread, in order.
    pub(super) fn sync_strict(&mut self) {
        let (Some(registry), Some(model)) = (&self.registry, &self.model) else { return };
        let mut want = HashMap::new();
        for (ns, addresses) in registry.served_pods() {
            let Some(w) = addresses.first().and_then(|a| model.local_with(*a).ok().flatten()) else { continue };
            if let (true, model::Mode::Meshed { skip_inbound, .. }) = (w.strict, &w.mode) {
                let ruleset = crate::control::return_path::strict_ruleset(&self.probe_sources, skip_inbound);
                want.insert(ns.id(), (ns.clone(), ruleset));
            }
        }
        for (id, (ns, _)) in &self.strict {
            if !want.contains_key(id) {
                self.return_paths.strict(ns.clone(), None);
            }
        }
        // A previous agent may have left one in a pod whose namespace is no
        // longer strict: the first look removes any it does not want.
        if !self.strict_swept {
            self.strict_swept = true;
            for (ns, _) in registry.served_pods().filter(|(ns, _)| !want.contains_key(&ns.id())) {
                self.return_paths.strict(ns.clone(), None);
            }
        }
        for (id, (ns, ruleset)) in &want {
            if self.strict.get(id).map(|(_, r)| r) != Some(ruleset) {
                self.return_paths.strict(ns.clone(), Some(ruleset.clone()));
            }
        }
        self.strict = want;
    }
}
