//! A queue's Fabrics commands (Connect for the admin and I/O queues, Property Get and Set)
//! and the admin queue's commands (Identify, Get Log Page, features, asynchronous events,
//! keep alive), with the discovery controller's log.

use super::*;

impl Queue<'_> {
    pub(super) fn fabrics(&mut self, sqe: &[u8; 64], cid: u16, data: &[u8]) -> Result<(), ConnectionError> {
        match sqe[4] {
            FCTYPE_CONNECT => self.connect(sqe, cid, data),
            FCTYPE_PROPERTY_SET | FCTYPE_PROPERTY_GET if self.admin.is_none() => {
                self.respond(cid, 0, 0, Status::INVALID_FIELD);
                Ok(())
            }
            FCTYPE_PROPERTY_SET => {
                let offset = u32_at(sqe, 44);
                let value = u32_at(sqe, 48);
                let a = self.admin.as_mut().expect("checked above");
                let status = match offset {
                    PROP_CC => {
                        a.cc = value;
                        let mut csts = u32::from(value & 1 != 0); // RDY follows EN
                        if (value >> 14) & 3 != 0 {
                            csts |= 2 << 2; // SHST: shutdown complete
                        }
                        a.csts = csts;
                        Status::SUCCESS
                    }
                    _ => Status::INVALID_FIELD,
                };
                self.respond(cid, 0, 0, status);
                Ok(())
            }
            FCTYPE_PROPERTY_GET => {
                let offset = u32_at(sqe, 44);
                let a = self.admin.as_ref().expect("checked above");
                let value: Option<u64> = match offset {
                    // MQES (0-based), CQR, TO 7.5 s, CSS: NVM command set; pages 4 KiB.
                    PROP_CAP => Some(u64::from(IO_QUEUE_ENTRIES - 1) | (1 << 16) | (15 << 24) | (1 << 37)),
                    PROP_VS => Some(0x0001_0300),
                    PROP_CC => Some(u64::from(a.cc)),
                    PROP_CSTS => Some(u64::from(a.csts)),
                    _ => None,
                };
                match value {
                    Some(v) => {
                        let (low, high) = halves(v);
                        self.respond(cid, low, high, Status::SUCCESS);
                    }
                    None => self.respond(cid, 0, 0, Status::INVALID_FIELD),
                }
                Ok(())
            }
            _ => {
                self.respond(cid, 0, 0, Status::INVALID_OPCODE);
                Ok(())
            }
        }
    }

    /// Connect refused: the attribute at fault (0 the command, 1 its data) and its byte offset.
    pub(super) fn refuse_connect(&self, cid: u16, status: Status, in_data: bool, offset: u16, why: &str) {
        tracing::warn!("nvmf: {}: Connect refused: {why}", self.peer);
        self.respond(cid, u32::from(in_data) | (u32::from(offset) << 16), 0, status);
    }

    pub(super) fn connect(&mut self, sqe: &[u8; 64], cid: u16, data: &[u8]) -> Result<(), ConnectionError> {
        if self.ctrl.is_some() {
            self.respond(cid, 0, 0, Status::SEQUENCE_ERROR);
            return Ok(());
        }
        if u16_at(sqe, 40) != 0 {
            self.refuse_connect(cid, Status::CONNECT_INCOMPATIBLE_FORMAT, false, 40, "record format other than 0");
            return Ok(());
        }
        if data.len() < 1024 {
            self.respond(cid, 0, 0, Status::DATA_SGL_LENGTH);
            return Ok(());
        }
        let qid = u16_at(sqe, 42);
        let sqsize = u16_at(sqe, 44);
        let kato = u32_at(sqe, 48);
        let cntlid = u16_at(data, 16);
        let subnqn = cstr(&data[256..512]);
        let hostnqn = cstr(&data[512..768]);
        if sqsize == 0 || sqsize >= IO_QUEUE_ENTRIES {
            let why = format!("queue size {} outside 2..={IO_QUEUE_ENTRIES}", u32::from(sqsize) + 1);
            self.refuse_connect(cid, Status::CONNECT_INVALID_PARAMETERS, false, 44, &why);
            return Ok(());
        }
        if qid == 0 {
            let volume = if subnqn == DISCOVERY_NQN {
                None
            } else {
                match subnqn.strip_prefix(NQN_PREFIX).filter(|v| self.shared.registry.lookup(v).is_some()) {
                    Some(v) => Some(v.to_owned()),
                    None => {
                        let why = format!("no subsystem {subnqn:?} here");
                        self.refuse_connect(cid, Status::CONNECT_INVALID_PARAMETERS, true, 256, &why);
                        return Ok(());
                    }
                }
            };
            if let Some(v) = &volume {
                if !self.shared.registry.admits(v, &crate::frontend::ClientId::at(self.peer.ip())) {
                    let why = format!("volume {v:?} does not admit {} (its allow-list)", self.peer.ip());
                    self.refuse_connect(cid, Status::CONNECT_INVALID_HOST, true, 512, &why);
                    return Ok(());
                }
            }
            let ana = volume.as_deref().map_or(AnaState::Optimized, |v| self.shared.ana_state(v));
            let ns_bytes = volume.as_deref().and_then(|v| self.shared.registry.lookup(v)).map_or(0, |e| e.size());
            let ctrl = self.shared.new_controller(volume, subnqn, hostnqn, self.peer);
            tracing::info!(
                "nvmf: {}: controller {:#06x} of {} for {} (ANA {ana:?}, keep alive {kato} ms)",
                self.peer,
                ctrl.cntlid,
                ctrl.subnqn,
                ctrl.hostnqn
            );
            self.admin = Some(AdminState {
                cc: 0,
                csts: 0,
                kato_ms: kato,
                async_config: 0,
                aers: Vec::new(),
                ana,
                ana_changes: 0,
                notice_owed: false,
                ns_bytes,
                ns_changed: false,
                ns_notice_owed: false,
                last_heard: Instant::now(),
            });
            self.info.entries.store(u32::from(sqsize) + 1, Ordering::Relaxed);
            let id = ctrl.cntlid;
            self.ctrl = Some(ctrl);
            self.respond(cid, u32::from(id), 0, Status::SUCCESS);
            return Ok(());
        }
        let found = self.shared.controllers.lock().get(&cntlid).cloned();
        let Some(ctrl) = found.filter(|c| c.alive.load(Ordering::Acquire)) else {
            let why = format!("I/O queue {qid} for controller {cntlid:#06x}, which does not exist");
            self.refuse_connect(cid, Status::CONNECT_INVALID_PARAMETERS, true, 16, &why);
            return Ok(());
        };
        if ctrl.subnqn != subnqn || ctrl.hostnqn != hostnqn {
            let why = format!("I/O queue {qid} names controller {cntlid:#06x} of another subsystem or host");
            self.refuse_connect(cid, Status::CONNECT_INVALID_PARAMETERS, true, 16, &why);
            return Ok(());
        }
        if let Some(v) = ctrl
            .volume
            .as_deref()
            .filter(|v| !self.shared.registry.admits(v, &crate::frontend::ClientId::at(self.peer.ip())))
        {
            let why = format!("volume {v:?} does not admit {} (its allow-list)", self.peer.ip());
            self.refuse_connect(cid, Status::CONNECT_INVALID_HOST, true, 512, &why);
            return Ok(());
        }
        if ctrl.volume.is_none() || qid > ctrl.io_queues.load(Ordering::Acquire) {
            let why = format!("I/O queue {qid} beyond the {} granted", ctrl.io_queues.load(Ordering::Acquire));
            self.refuse_connect(cid, Status::CONNECT_INVALID_PARAMETERS, false, 42, &why);
            return Ok(());
        }
        self.info.qid.store(qid, Ordering::Relaxed);
        self.info.entries.store(u32::from(sqsize) + 1, Ordering::Relaxed);
        if let Some(v) = &ctrl.volume {
            let _ = self.info.volume.set(v.clone());
        }
        self.reader.set_capsule_data_max(INLINE_DATA_BYTES);
        self.ctrl = Some(ctrl);
        self.respond(cid, 0, 0, Status::SUCCESS);
        self.adopt = true;
        Ok(())
    }

    pub(super) fn guid(&self, volume: &str) -> [u8; 16] {
        admin::namespace_guid(self.shared.registry.volume_id(volume).unwrap_or(0), volume)
    }

    pub(super) fn admin_command(&mut self, sqe: &[u8; 64], cid: u16) {
        let ctrl = self.ctrl.clone().expect("connected");
        let nsid = u32_at(sqe, 4);
        let cdw11 = u32_at(sqe, 44);
        match sqe[0] {
            ADMIN_IDENTIFY => {
                let cns = sqe[40];
                let page = match (cns, &ctrl.volume) {
                    (0x01, _) => {
                        let serial = match &ctrl.volume {
                            Some(v) => format!("{:016x}", self.shared.registry.volume_id(v).unwrap_or(0)),
                            None => "discovery".to_owned(),
                        };
                        admin::identify_controller(&ControllerIdentity {
                            cntlid: ctrl.cntlid,
                            subnqn: &ctrl.subnqn,
                            serial: &serial,
                            io: ctrl.volume.is_some(),
                        })
                    }
                    (0x00 | 0x03, Some(v)) => {
                        if nsid != NSID {
                            return self.respond(cid, 0, 0, Status::INVALID_NAMESPACE);
                        }
                        if cns == 0x03 {
                            admin::namespace_descriptors(self.guid(v))
                        } else {
                            let Some(export) = self.shared.registry.lookup(v) else {
                                return self.respond(cid, 0, 0, Status::INVALID_NAMESPACE);
                            };
                            admin::identify_namespace(export.size(), self.guid(v))
                        }
                    }
                    (0x02, Some(_)) => admin::active_namespaces(nsid),
                    _ => return self.respond(cid, 0, 0, Status::INVALID_FIELD),
                };
                self.respond_data(cid, sqe, &page, 0);
            }
            ADMIN_GET_LOG_PAGE => {
                let lid = sqe[40];
                let lsp = sqe[41] & 0x0f;
                let dwords = ((u64::from(u16_at(sqe, 46)) << 16) | u64::from(u16_at(sqe, 42))) + 1;
                let offset = u64_at(sqe, 48);
                if dwords * 4 > TRANSFER_BYTES_MAX as u64 || dwords * 4 > u64::from(u32_at(sqe, 32)) {
                    return self.respond(cid, 0, 0, Status::INVALID_FIELD);
                }
                let rae = sqe[41] & 0x80 != 0;
                let a = self.admin.as_mut().expect("admin queue");
                let page = match (lid, &ctrl.volume) {
                    (0x01, _) => vec![0u8; admin::ERROR_LOG_ENTRY_BYTES],
                    (0x02, _) => admin::smart_log(),
                    (0x04, Some(_)) => {
                        // Read (without Retain Asynchronous Event): the list starts over.
                        let page = admin::changed_namespaces(a.ns_changed);
                        if !rae {
                            a.ns_changed = false;
                        }
                        page
                    }
                    (0x0c, Some(_)) => admin::ana_log(a.ana_changes, a.ana, lsp & 1 != 0),
                    (0x70, None) => admin::discovery_log(&self.discovery_entries()),
                    _ => return self.respond(cid, 0, 0, Status::INVALID_LOG_PAGE),
                };
                if !offset.is_multiple_of(4) || offset > page.len() as u64 {
                    return self.respond(cid, 0, 0, Status::INVALID_FIELD);
                }
                self.respond_data(cid, sqe, &page, crate::usize_of(offset));
            }
            ADMIN_SET_FEATURES => {
                let a = self.admin.as_mut().expect("admin queue");
                match sqe[40] {
                    FEAT_NUM_QUEUES => {
                        let (nsqr, ncqr) = (cdw11 & 0xffff, cdw11 >> 16);
                        if nsqr == 0xffff || ncqr == 0xffff || ctrl.volume.is_none() {
                            return self.respond(cid, 0, 0, Status::INVALID_FIELD);
                        }
                        let granted = (nsqr.min(ncqr) + 1).min(u32::from(IO_QUEUES_MAX));
                        ctrl.io_queues.store(u16::try_from(granted).unwrap_or(IO_QUEUES_MAX), Ordering::Release);
                        self.respond(cid, (granted - 1) | ((granted - 1) << 16), 0, Status::SUCCESS);
                    }
                    FEAT_ASYNC_EVENT => {
                        a.async_config = cdw11;
                        self.respond(cid, 0, 0, Status::SUCCESS);
                    }
                    FEAT_KEEP_ALIVE => {
                        a.kato_ms = cdw11;
                        self.respond(cid, 0, 0, Status::SUCCESS);
                    }
                    _ => self.respond(cid, 0, 0, Status::INVALID_FIELD),
                }
            }
            ADMIN_GET_FEATURES => {
                let a = self.admin.as_ref().expect("admin queue");
                let value = match sqe[40] {
                    FEAT_NUM_QUEUES => {
                        let n = u32::from(ctrl.io_queues.load(Ordering::Acquire)).max(1) - 1;
                        Some(n | (n << 16))
                    }
                    FEAT_ASYNC_EVENT => Some(a.async_config),
                    FEAT_KEEP_ALIVE => Some(a.kato_ms),
                    _ => None,
                };
                match value {
                    Some(v) => self.respond(cid, v, 0, Status::SUCCESS),
                    None => self.respond(cid, 0, 0, Status::INVALID_FIELD),
                }
            }
            ADMIN_ASYNC_EVENT => {
                let a = self.admin.as_mut().expect("admin queue");
                if a.aers.len() >= AER_MAX {
                    return self.respond(cid, 0, 0, Status::AER_LIMIT);
                }
                a.aers.push(cid);
                self.send_owed_notice();
            }
            ADMIN_KEEP_ALIVE => self.respond(cid, 0, 0, Status::SUCCESS),
            // Nothing is aborted: bit 0 set says so.
            ADMIN_ABORT => self.respond(cid, 1, 0, Status::SUCCESS),
            _ => self.respond(cid, 0, 0, Status::INVALID_OPCODE),
        }
    }

    /// Every volume's subsystem, at this node's address and at the other node's of its pair.
    pub(super) fn discovery_entries(&self) -> Vec<DiscoveryEntry> {
        let mut entries = Vec::new();
        let here = SocketAddr::new(self.local.ip(), self.shared.port);
        for name in self.shared.registry.names() {
            let subnqn = super::super::subsystem_nqn(&name);
            entries.push(DiscoveryEntry { subnqn: subnqn.clone(), addr: here, port_id: 1 });
            for addr in self.shared.registry.other_paths(&name) {
                entries.push(DiscoveryEntry { subnqn: subnqn.clone(), addr, port_id: 2 });
            }
        }
        entries
    }
}
