//! The fixed newstyle handshake: options (export name, go and info, list, structured
//! replies, meta contexts) negotiated with bounds on their count and size.

use super::*;

/// What the handshake settled for the transmission phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Reads are answered with structured replies.
    pub structured: bool,
    /// `base:allocation` was selected for the export: `BLOCK_STATUS` is allowed.
    pub allocation: bool,
}

pub(super) enum Negotiated {
    Transmit(Arc<dyn Export>, Options),
    /// The client aborted or left; no transmission follows.
    Closed,
}

pub(super) fn handshake_read_error(err: io::Error) -> ConnectionError {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        ConnectionError::HandshakeClosed
    } else {
        ConnectionError::ReadHandshake(err)
    }
}

pub(super) fn negotiate(
    mut wire: Wire,
    registry: &dyn ExportRegistry,
    tls: Option<&NbdTls>,
) -> Result<(Wire, Negotiated), ConnectionError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wire.write_all(&greeting).map_err(ConnectionError::WriteHandshake)?;

    let mut client_flags = [0u8; 4];
    if !read_full(&mut wire, &mut client_flags).map_err(handshake_read_error)? {
        // Connected and left without a word, as TCP health checks do: nothing to report.
        return Ok((wire, Negotiated::Closed));
    }
    let client_flags = u32::from_be_bytes(client_flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 || client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ConnectionError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    // Without an address, no allow-list admits the client.
    let mut client = wire.client();
    let mut structured = false;
    // The export `SET_META_CONTEXT` last selected `base:allocation` for.
    let mut allocation_for: Option<Vec<u8>> = None;

    // Whether a plain client was told TLS is required: its leaving is then that refusal.
    let mut told_tls = false;
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; 16];
        wire.read_exact(&mut header).map_err(|e| match handshake_read_error(e) {
            ConnectionError::HandshakeClosed if told_tls && !wire.is_tls() => ConnectionError::PlainClientLeft,
            other => other,
        })?;
        let magic = be_u64(&header, 0);
        let option = be_u32(&header, 8);
        let len = be_u32(&header, 12);
        if magic != IHAVEOPT {
            return Err(ConnectionError::OptionMagic(magic));
        }
        if len > OPTION_BYTES_MAX {
            return Err(ConnectionError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        wire.read_exact(&mut data).map_err(handshake_read_error)?;
        let admits = |name: &str| client.as_ref().is_some_and(|c| registry.admits(name, c));

        // Forced TLS: nothing but STARTTLS (and ABORT) before it.
        if let Some(tls) = tls.filter(|_| !wire.is_tls()) {
            match option {
                OPT_STARTTLS if data.is_empty() => {
                    send_option_reply(&mut wire, option, REP_ACK, &[])?;
                    wire = wire.start_tls(tls).map_err(ConnectionError::TlsHandshake)?;
                    // The client is who TLS says it is now; nothing settled before counts.
                    client = wire.client();
                    (structured, allocation_for) = (false, None);
                    continue;
                }
                OPT_STARTTLS => {
                    send_option_reply(&mut wire, option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
                    continue;
                }
                OPT_ABORT => {}
                // This option has no error reply: closing is the only refusal.
                OPT_EXPORT_NAME => return Err(ConnectionError::TlsRequired),
                _ => {
                    told_tls = true;
                    send_option_reply(
                        &mut wire,
                        option,
                        REP_ERR_TLS_REQD,
                        b"this server requires TLS: NBD_OPT_STARTTLS first",
                    )?;
                    continue;
                }
            }
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = registry.lookup(&name) else {
                    // This option has no error reply: closing is the only refusal.
                    return Err(ConnectionError::UnknownExport(name.into_owned()));
                };
                if !admits(&name) {
                    return Err(ConnectionError::NotAdmitted(name.into_owned()));
                }
                let mut reply = Vec::with_capacity(10 + EXPORT_NAME_ZEROES_BYTES);
                reply.extend_from_slice(&export.size().to_be_bytes());
                reply.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
                if !no_zeroes {
                    reply.resize(reply.len() + EXPORT_NAME_ZEROES_BYTES, 0);
                }
                wire.write_all(&reply).and_then(|()| wire.flush()).map_err(ConnectionError::WriteHandshake)?;
                let allocation = allocation_for.as_deref() == Some(&data[..]);
                return Ok((wire, Negotiated::Transmit(export, Options { structured, allocation })));
            }
            OPT_ABORT => {
                // The client may already have gone; the acknowledgement is a courtesy.
                let _ = send_option_reply(&mut wire, option, REP_ACK, &[]);
                return Ok((wire, Negotiated::Closed));
            }
            OPT_STARTTLS => {
                let why: &[u8] = if wire.is_tls() {
                    b"TLS is already running"
                } else {
                    b"this server does not offer TLS (a node started with --tls-cert does)"
                };
                let rep = if wire.is_tls() { REP_ERR_INVALID } else { REP_ERR_POLICY };
                send_option_reply(&mut wire, option, rep, why)?;
            }
            OPT_LIST => list_exports(&mut wire, registry, &data, &admits)?,
            OPT_INFO | OPT_GO => {
                if let Some(export) = export_info(&mut wire, registry, option, &data, &admits)? {
                    if option == OPT_GO {
                        let name = InfoRequest::parse(&data).map(|r| r.name);
                        let allocation = name.is_some_and(|n| allocation_for.as_deref() == Some(n));
                        return Ok((wire, Negotiated::Transmit(export, Options { structured, allocation })));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    send_option_reply(&mut wire, option, REP_ACK, &[])?;
                } else {
                    send_option_reply(&mut wire, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Every SET replaces what an earlier one selected, failed ones too.
                    allocation_for = None;
                }
                if !structured {
                    send_option_reply(&mut wire, option, REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")?;
                    continue;
                }
                let Some(query) = MetaQuery::parse(&data) else {
                    send_option_reply(&mut wire, option, REP_ERR_INVALID, b"malformed metadata context request")?;
                    continue;
                };
                let known =
                    std::str::from_utf8(query.export).ok().is_some_and(|n| registry.lookup(n).is_some() && admits(n));
                if !known {
                    send_option_reply(&mut wire, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                if query.selects_allocation(set) {
                    let id = if set { META_ALLOCATION_ID } else { 0 };
                    let mut reply = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
                    reply.extend_from_slice(&id.to_be_bytes());
                    reply.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    send_option_reply(&mut wire, option, REP_META_CONTEXT, &reply)?;
                    if set {
                        allocation_for = Some(query.export.to_vec());
                    }
                }
                send_option_reply(&mut wire, option, REP_ACK, &[])?;
            }
            _ => send_option_reply(&mut wire, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
    Err(ConnectionError::TooManyOptions)
}

fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

fn send_option_reply(wire: &mut Wire, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ConnectionError> {
    // Reply data is an export name, a short message or a fixed-size info record; all are
    // bounded by OPTION_BYTES_MAX or by the registry's names, far below 4 GiB.
    let len = u32::try_from(data.len()).expect("option reply data fits in u32");
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&reply_type.to_be_bytes());
    reply.extend_from_slice(&len.to_be_bytes());
    reply.extend_from_slice(data);
    wire.write_all(&reply).and_then(|()| wire.flush()).map_err(ConnectionError::WriteHandshake)
}

/// Answers NBD_OPT_LIST.
fn list_exports(
    wire: &mut Wire,
    registry: &dyn ExportRegistry,
    data: &[u8],
    admits: &dyn Fn(&str) -> bool,
) -> Result<(), ConnectionError> {
    if !data.is_empty() {
        return send_option_reply(wire, OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
    }
    for name in registry.names().into_iter().filter(|n| admits(n)) {
        let Ok(name_len) = u32::try_from(name.len()) else {
            continue;
        };
        let mut entry = Vec::with_capacity(4 + name.len());
        entry.extend_from_slice(&name_len.to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        send_option_reply(wire, OPT_LIST, REP_SERVER, &entry)?;
    }
    send_option_reply(wire, OPT_LIST, REP_ACK, &[])
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO; returns the export when the answer was a success.
fn export_info(
    wire: &mut Wire,
    registry: &dyn ExportRegistry,
    option: u32,
    data: &[u8],
    admits: &dyn Fn(&str) -> bool,
) -> Result<Option<Arc<dyn Export>>, ConnectionError> {
    // Data: name length u32, name, number of information requests u16, requests u16 each.
    let Some(request) = InfoRequest::parse(data) else {
        send_option_reply(wire, option, REP_ERR_INVALID, b"malformed information request")?;
        return Ok(None);
    };
    let export = std::str::from_utf8(request.name).ok().and_then(|name| registry.lookup(name));
    let Some(export) = export else {
        send_option_reply(wire, option, REP_ERR_UNKNOWN, b"no such export")?;
        return Ok(None);
    };
    if !std::str::from_utf8(request.name).is_ok_and(admits) {
        send_option_reply(wire, option, REP_ERR_POLICY, b"this export does not admit your address")?;
        return Ok(None);
    }

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size().to_be_bytes());
    info.extend_from_slice(&transmission_flags(export.as_ref()).to_be_bytes());
    send_option_reply(wire, option, REP_INFO, &info)?;

    // Sent whether or not it was asked for, which the protocol allows: a minimum of 1 asks
    // nothing of clients that do not read it.
    let mut block_size = Vec::with_capacity(14);
    block_size.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    block_size.extend_from_slice(&1u32.to_be_bytes());
    block_size.extend_from_slice(&BLOCK_BYTES_PREFERRED.to_be_bytes());
    block_size.extend_from_slice(&PAYLOAD_BYTES_MAX.to_be_bytes());
    send_option_reply(wire, option, REP_INFO, &block_size)?;

    if request.asks_for(INFO_NAME) {
        let mut name = Vec::with_capacity(2 + request.name.len());
        name.extend_from_slice(&INFO_NAME.to_be_bytes());
        name.extend_from_slice(request.name);
        send_option_reply(wire, option, REP_INFO, &name)?;
    }
    send_option_reply(wire, option, REP_ACK, &[])?;
    Ok(Some(export))
}

/// The data of an NBD_OPT_INFO or NBD_OPT_GO option, borrowed from the option bytes.
pub(super) struct InfoRequest<'a> {
    pub(super) name: &'a [u8],
    /// Information types asked for, two bytes each.
    pub(super) requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    pub(super) fn parse(data: &'a [u8]) -> Option<Self> {
        let (name_len, rest) = data.split_first_chunk::<4>()?;
        let name_len = usize::try_from(u32::from_be_bytes(*name_len)).ok()?;
        if rest.len() < name_len {
            return None;
        }
        let (name, rest) = rest.split_at(name_len);
        let (count, requests) = rest.split_first_chunk::<2>()?;
        if requests.len() != usize::from(u16::from_be_bytes(*count)) * 2 {
            return None;
        }
        Some(Self { name, requests })
    }

    pub(super) fn asks_for(&self, info_type: u16) -> bool {
        self.requests.chunks_exact(2).any(|pair| pair == info_type.to_be_bytes())
    }
}

/// The data of an NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT option.
pub(super) struct MetaQuery<'a> {
    pub(super) export: &'a [u8],
    pub(super) queries: Vec<&'a [u8]>,
}

/// Queries one option may carry; more is a malformed request here.
const META_QUERIES_MAX: usize = 64;

impl<'a> MetaQuery<'a> {
    pub(super) fn parse(data: &'a [u8]) -> Option<Self> {
        let (len, rest) = data.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (export, rest) = rest.split_at(len);
        let (count, mut rest) = rest.split_first_chunk::<4>()?;
        let count = usize::try_from(u32::from_be_bytes(*count)).ok()?;
        if count > META_QUERIES_MAX {
            return None;
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            let (len, r) = rest.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            if r.len() < len {
                return None;
            }
            let (q, r) = r.split_at(len);
            queries.push(q);
            rest = r;
        }
        rest.is_empty().then_some(Self { export, queries })
    }

    /// Whether `base:allocation` answers the queries: to a LIST, no query or a `base:`
    /// wildcard or the name itself; to a SET, the name itself only.
    pub(super) fn selects_allocation(&self, set: bool) -> bool {
        let name = META_BASE_ALLOCATION.as_bytes();
        if self.queries.is_empty() {
            return !set;
        }
        self.queries.iter().any(|q| *q == name || (!set && *q == b"base:"))
    }
}
