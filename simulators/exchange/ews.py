"""The simulated EWS endpoint (``/EWS/Exchange.asmx``): Exchange Web Services SOAP, as Exchange Server 2019.

Follows the published EWS contract (SOAP 1.1 envelope in the ``messages``/``types`` namespaces, the
``RequestServerVersion`` and ``ExchangeImpersonation`` headers, ``ServerVersionInfo`` in every response
header, one ``{Operation}ResponseMessage`` per requested object with ``ResponseClass``/``ResponseCode``).
Operations served, enough for exchangelib to connect, send, read and sync:

- ``ConvertId`` (exchangelib's version probe), ``ResolveNames``
- ``GetFolder``, ``FindFolder`` (distinguished and id folder references, ``Mailbox`` for delegate access)
- ``CreateItem`` with ``MessageDisposition`` ``SaveOnly``, ``SendOnly`` and ``SendAndSaveCopy``, from
  ``MimeContent`` or from item properties; appointments, contacts and tasks are stored (SaveOnly) with
  their properties kept as text for the later exchange_sync work
- ``FindItem`` (paging, ``IsEqualTo``-style restrictions, sort), ``GetItem`` (``IdOnly``/``Default``/
  ``AllProperties`` shapes, ``AdditionalProperties``, ``IncludeMimeContent``)
- ``SyncFolderItems`` (sync states are positions in the store's change log), ``DeleteItem``, ``MoveItem``

Authentication: Basic, or an OAuth bearer token from the simulated token endpoint (app-only tokens must
carry ``ExchangeImpersonation``, as Exchange requires).  Failures are answered as Exchange answers them:
401 with ``WWW-Authenticate`` for bad credentials, SOAP faults for header problems (impersonation denied,
unknown mailbox) and ``ErrorServerBusy`` (with ``BackOffMilliseconds``), error response messages for
per-object problems (``ErrorAccessDenied``, ``ErrorItemNotFound``, ``ErrorSendAsDenied``...).  An
injected fault may also let an operation be served and its answer come late or never (``answering``).

Not served: NTLM/Negotiate, autodiscover, notifications (subscribe, streaming), attachments as separate
operations, UpdateItem beyond ``IsRead``, calendar semantics (recurrence, meeting requests).
"""
from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from lxml import etree

from . import answering
from .store import (
    EWS_AUDIENCE,
    Address,
    App,
    Attachment,
    Fault,
    Faults,
    Folder,
    Item,
    Mailbox,
    Organization,
    Principal,
    build_mime,
)

log = logging.getLogger(__name__)

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
NSMAP = {"s": SOAP, "m": M, "t": T}

# Exchange Server 2019 CU12: what exchangelib reads to pick its API version.
SERVER_VERSION = {"MajorVersion": "15", "MinorVersion": "2", "MajorBuildNumber": "1118",
                  "MinorBuildNumber": "7", "Version": "V2017_07_11"}

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def t(name: str) -> str:
    return f"{{{T}}}{name}"


def m(name: str) -> str:
    return f"{{{M}}}{name}"


def sub(parent: etree._Element, tag: str, text: object = None, **attrib: str) -> etree._Element:
    e = etree.SubElement(parent, tag, {k: str(v) for k, v in attrib.items()})
    if text is not None:
        e.text = text if isinstance(text, str) else str(text).lower() if isinstance(text, bool) else str(text)
    return e


def ews_time(dt) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class EwsError(Exception):
    """A per-object failure, answered as an error response message."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class SoapFault(Exception):
    """A request-level failure, answered as a SOAP fault (HTTP 500)."""

    def __init__(self, code: str, text: str, back_off_ms: int | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.back_off_ms = back_off_ms


@dataclass
class Caller:
    principal: Principal | None
    app: App | None
    impersonated: Mailbox | None = None

    @property
    def name(self) -> str:
        return self.principal.username.lower() if self.principal else f"app:{self.app.client_id}"  # type: ignore

    def owns(self, box: Mailbox) -> bool:
        if self.impersonated is not None:
            return self.impersonated is box
        return self.principal is not None and (self.principal.mailbox or "").lower() == box.address.lower()

    def can_open(self, box: Mailbox) -> bool:
        return self.owns(box) or (self.impersonated is None and self.name in box.full_access)

    def can_send_as(self, box: Mailbox) -> bool:
        return self.owns(box) or (self.impersonated is None and self.name in box.send_as)

    @property
    def default_mailbox(self) -> Mailbox | None:
        return self.impersonated


class EwsEndpoint:
    """The aiohttp handler for ``POST /EWS/Exchange.asmx``."""

    def __init__(self, org: Organization, faults: Faults) -> None:
        self.org = org
        self.faults = faults
        self.requests: list[str] = []  # operation names served, in order (for tests)
        self._ops: dict[str, Callable[[Caller, etree._Element, etree._Element], None]] = {
            "ConvertId": self._convert_id,
            "ResolveNames": self._resolve_names,
            "GetFolder": self._get_folder,
            "FindFolder": self._find_folder,
            "CreateItem": self._create_item,
            "FindItem": self._find_item,
            "GetItem": self._get_item,
            "SyncFolderItems": self._sync_folder_items,
            "DeleteItem": self._delete_item,
            "MoveItem": self._move_item,
        }

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        return await answering.answer(request, await self._serve(request), self._injected)

    async def _serve(self, request: web.Request) -> web.Response:
        self.org.file_due()  # sends filed late show up once their time has come
        caller = self._authenticate(request)
        if caller is None:
            # IIS answers before EWS sees the body; exchangelib reads the offered schemes from these headers.
            return web.Response(status=401, headers=[("WWW-Authenticate", 'Basic realm="sim.exchange.test"'),
                                                     ("WWW-Authenticate", "Bearer")])
        raw = await request.read()
        try:
            envelope = etree.fromstring(raw, _PARSER)
        except etree.XMLSyntaxError as e:
            return self._fault(SoapFault("ErrorSchemaValidation", f"The request failed schema validation: {e}"))
        header = envelope.find(f"{{{SOAP}}}Header")
        body = envelope.find(f"{{{SOAP}}}Body")
        if body is None or len(body) == 0:
            return self._fault(SoapFault("ErrorInvalidRequest", "The request is invalid."))
        operation_elem = body[0]
        operation = etree.QName(operation_elem).localname
        self.requests.append(operation)
        fault = answering.hold(request, self.faults.take("ews", operation))  # LATE, DROP, served: see ``__call__``
        if fault is not None and fault.status != 200:
            return self._injected(fault)
        try:
            self._check_version(header)
            self._impersonate(caller, header)
            if caller.app is not None and caller.impersonated is None:
                raise SoapFault("ErrorInvalidExchangeImpersonationHeaderData",
                                "ExchangeImpersonation SOAP header must be present for this type of OAuth token.")
        except SoapFault as f:
            return self._fault(f)
        response = etree.Element(m(f"{operation}Response"), nsmap={"m": M, "t": T})
        messages = sub(response, m("ResponseMessages"))
        handler = self._ops.get(operation)
        if fault is not None:
            self._error(messages, operation, EwsError(fault.code, fault.message))
        elif handler is None:
            self._error(messages, operation, EwsError("ErrorInvalidOperation",
                                                      f"The simulator does not implement {operation}."))
        else:
            try:
                handler(caller, operation_elem, messages)
            except SoapFault as f:
                return self._fault(f)
        return self._envelope(response)

    # -- authentication and headers

    def _authenticate(self, request: web.Request) -> Caller | None:
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            principal = self.org.authenticate(user, password)
            return Caller(principal=principal, app=None) if principal else None
        if scheme.lower() == "bearer":
            issued = self.org.tokens.get(value.strip())
            if issued is None or issued.expires_at <= self.org.clock() or issued.audience != EWS_AUDIENCE:
                return None
            app = self.org.apps.get(issued.client_id)
            return Caller(principal=None, app=app) if app else None
        return None

    def _check_version(self, header: etree._Element | None) -> None:
        rsv = header.find(t("RequestServerVersion")) if header is not None else None
        version = rsv.get("Version") if rsv is not None else "Exchange2013"
        if not (version.startswith(("Exchange2007", "Exchange2010", "Exchange2013"))
                or version in ("Exchange2015", "Exchange2015_SP1", "Exchange2016", "V2017_07_11")):
            raise SoapFault("ErrorInvalidServerVersion", "The specified server version is invalid.")

    def _impersonate(self, caller: Caller, header: etree._Element | None) -> None:
        imp = header.find(t("ExchangeImpersonation")) if header is not None else None
        if imp is None:
            return
        address = None
        for name in ("PrimarySmtpAddress", "SmtpAddress", "PrincipalName"):
            found = imp.find(f".//{t(name)}")
            if found is not None and found.text:
                address = found.text.strip()
                break
        box = self.org.find_mailbox(address)
        if box is None:
            raise SoapFault("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.")
        allowed = (caller.principal is not None and caller.principal.impersonation) or (
            caller.app is not None and (caller.app.mailboxes is None or box.address.lower() in caller.app.mailboxes))
        if not allowed:
            raise SoapFault("ErrorImpersonateUserDenied",
                            "The account does not have permission to impersonate the requested user.")
        caller.impersonated = box

    # -- responses

    def _envelope(self, payload: etree._Element, status: int = 200) -> web.Response:
        env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP})
        head = sub(env, f"{{{SOAP}}}Header")
        etree.SubElement(head, t("ServerVersionInfo"), SERVER_VERSION, nsmap={"h": T})
        sub(env, f"{{{SOAP}}}Body").append(payload)
        return web.Response(status=status, body=etree.tostring(env, xml_declaration=True, encoding="utf-8"),
                            content_type="text/xml", charset="utf-8")

    def _fault(self, f: SoapFault) -> web.Response:
        env = etree.Element(f"{{{SOAP}}}Envelope", nsmap={"s": SOAP})
        body = sub(env, f"{{{SOAP}}}Body")
        fault = sub(body, f"{{{SOAP}}}Fault")
        code = etree.SubElement(fault, "faultcode", nsmap={"a": T})
        code.text = f"a:{f.code}"
        sub(fault, "faultstring", f.text)
        detail = sub(fault, "detail")
        etree.SubElement(detail, f"{{{E}}}ResponseCode", nsmap={"e": E}).text = f.code
        etree.SubElement(detail, f"{{{E}}}Message", nsmap={"e": E}).text = f.text
        if f.back_off_ms is not None:
            xml = etree.SubElement(detail, t("MessageXml"), nsmap={"t": T})
            sub(xml, t("Value"), f.back_off_ms, Name="BackOffMilliseconds")
        return web.Response(status=500, body=etree.tostring(env, xml_declaration=True, encoding="utf-8"),
                            content_type="text/xml", charset="utf-8")

    def _injected(self, fault: Fault) -> web.Response:
        if fault.status == 500:
            back_off = int(fault.retry_after * 1000) if fault.retry_after is not None else None
            if fault.code == "ErrorServerBusy" and back_off is None:
                back_off = 30000
            return self._fault(SoapFault(fault.code, fault.message, back_off))
        headers = {"Retry-After": str(int(fault.retry_after))} if fault.retry_after is not None else {}
        if fault.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="sim.exchange.test"'
        # Not SOAP: the page of IIS or of a gateway in front of Exchange.
        return answering.closing(web.Response(status=fault.status, text=fault.message, content_type="text/html",
                                              headers=headers), fault)

    @staticmethod
    def _message(messages: etree._Element, operation: str) -> etree._Element:
        msg = sub(messages, m(f"{operation}ResponseMessage"), ResponseClass="Success")
        sub(msg, m("ResponseCode"), "NoError")
        return msg

    @staticmethod
    def _error(messages: etree._Element, operation: str, err: EwsError) -> None:
        msg = sub(messages, m(f"{operation}ResponseMessage"), ResponseClass="Error")
        sub(msg, m("MessageText"), err.text)
        sub(msg, m("ResponseCode"), err.code)
        sub(msg, m("DescriptiveLinkKey"), "0")

    # -- folder references

    def _resolve_folder(self, caller: Caller, ref: etree._Element) -> Folder:
        """A ``FolderId`` or ``DistinguishedFolderId`` to a folder the caller may open."""
        if etree.QName(ref).localname == "DistinguishedFolderId":
            address = ref.findtext(f"{t('Mailbox')}/{t('EmailAddress')}")
            if address:
                box = self.org.find_mailbox(address)
                if box is None:
                    raise EwsError("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it.")
            else:
                box = caller.impersonated or self.org.find_mailbox(
                    caller.principal.mailbox if caller.principal else None)
                if box is None:
                    raise EwsError("ErrorMissingEmailAddress",
                                   "When making a request as an account that does not have a mailbox, you must "
                                   "specify the mailbox primary SMTP address for any distinguished folder Ids.")
            folder = box.folder(ref.get("Id", ""))
            if folder is None or folder.distinguished_id != ref.get("Id", "").lower():
                raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")
        else:
            folder = self._folder_by_id(ref.get("Id", ""))
            box = self.org.mailbox(folder.mailbox)
        if not caller.can_open(box):
            raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return folder

    def _folder_by_id(self, folder_id: str) -> Folder:
        for box in self.org.mailboxes.values():
            if folder_id in box.folders:
                return box.folders[folder_id]
        raise EwsError("ErrorFolderNotFound", "The specified folder could not be found in the store.")

    def _item_by_id(self, caller: Caller, item_id: str) -> tuple[Mailbox, Folder, Item]:
        for box in self.org.mailboxes.values():
            for folder in box.folders.values():
                if item_id in folder.items:
                    if not caller.can_open(box):
                        raise EwsError("ErrorAccessDenied", "Access is denied. Check credentials and try again.")
                    return box, folder, folder.items[item_id]
        raise EwsError("ErrorItemNotFound", "The specified object was not found in the store.")

    # -- operations

    def _convert_id(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        for alt in op.iter(t("AlternateId")):
            self._error(messages, "ConvertId", EwsError("ErrorInvalidIdMalformed", "Id is malformed."))

    def _resolve_names(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        needle = (op.findtext(m("UnresolvedEntry")) or "").strip().lower().removeprefix("smtp:")
        found = [b for b in self.org.mailboxes.values()
                 if b.address.lower().startswith(needle) or b.display_name.lower().startswith(needle)]
        if not found:
            self._error(messages, "ResolveNames", EwsError("ErrorNameResolutionNoResults",
                                                           "No results were found."))
            return
        msg = self._message(messages, "ResolveNames")
        if len(found) > 1:
            msg.set("ResponseClass", "Warning")
            msg.find(m("ResponseCode")).text = "ErrorNameResolutionMultipleResults"
            sub(msg, m("MessageText"), "Multiple results were found.")
        rs = sub(msg, m("ResolutionSet"), TotalItemsInView=str(len(found)), IncludesLastItemInRange="true")
        for box in found:
            _mailbox(sub(rs, t("Resolution")), t("Mailbox"), Address(box.address, box.display_name), internal=True)

    def _get_folder(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        ids = op.find(m("FolderIds"))
        for ref in (ids if ids is not None else []):
            try:
                folder = self._resolve_folder(caller, ref)
            except EwsError as err:
                self._error(messages, "GetFolder", err)
                continue
            msg = self._message(messages, "GetFolder")
            self._folder_xml(sub(msg, m("Folders")), folder)

    def _find_folder(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        deep = op.get("Traversal", "Shallow") == "Deep"
        parents = op.find(m("ParentFolderIds"))
        for ref in (parents if parents is not None else []):
            try:
                parent = self._resolve_folder(caller, ref)
            except EwsError as err:
                self._error(messages, "FindFolder", err)
                continue
            box = self.org.mailbox(parent.mailbox)
            found, frontier = [], [parent.id]
            while frontier:
                children = [f for f in box.folders.values() if f.parent_id in frontier]
                found.extend(children)
                frontier = [f.id for f in children] if deep else []
            msg = self._message(messages, "FindFolder")
            root = sub(msg, m("RootFolder"), TotalItemsInView=str(len(found)), IncludesLastItemInRange="true")
            folders = sub(root, t("Folders"))
            for f in found:
                self._folder_xml(folders, f)

    def _folder_xml(self, parent: etree._Element, folder: Folder) -> None:
        tag = {"IPF.Appointment": "CalendarFolder", "IPF.Contact": "ContactsFolder",
               "IPF.Task": "TasksFolder"}.get(folder.folder_class, "Folder")
        box = self.org.mailbox(folder.mailbox)
        e = sub(parent, t(tag))
        sub(e, t("FolderId"), Id=folder.id, ChangeKey=folder.change_key)
        if folder.parent_id:
            sub(e, t("ParentFolderId"), Id=folder.parent_id, ChangeKey=box.folders[folder.parent_id].change_key)
        if folder.folder_class:
            sub(e, t("FolderClass"), folder.folder_class)
        sub(e, t("DisplayName"), folder.display_name)
        if folder.distinguished_id:
            sub(e, t("DistinguishedFolderId"), folder.distinguished_id)
        rights = sub(e, t("EffectiveRights"))
        for right in ("CreateAssociated", "CreateContents", "CreateHierarchy", "Delete", "Modify", "Read",
                      "ViewPrivateItems"):
            sub(rights, t(right), True)
        sub(e, t("TotalCount"), len(folder.items))
        sub(e, t("ChildFolderCount"), sum(1 for f in box.folders.values() if f.parent_id == folder.id))
        if tag == "Folder":
            sub(e, t("UnreadCount"), folder.unread_count)

    def _create_item(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        disposition = op.get("MessageDisposition")
        saved_ref = op.find(f"{m('SavedItemFolderId')}/*")
        items = op.find(m("Items"))
        for elem in (items if items is not None else []):
            try:
                saved = self._resolve_folder(caller, saved_ref) if saved_ref is not None else None
                kind = etree.QName(elem).localname
                if kind == "Message":
                    created = self._create_message(caller, elem, disposition, saved)
                else:
                    created = self._create_other(caller, elem, kind, saved)
            except EwsError as err:
                self._error(messages, "CreateItem", err)
                continue
            msg = self._message(messages, "CreateItem")
            out = sub(msg, m("Items"))
            if created is not None:  # Exchange returns no id for a sent message
                e = sub(out, t(_ITEM_TAGS.get(created.item_class.split(".")[1] if "." in created.item_class
                                              else "Note", "Message")))
                sub(e, t("ItemId"), Id=created.id, ChangeKey=created.change_key)

    def _create_message(self, caller: Caller, elem: etree._Element, disposition: str | None,
                        saved: Folder | None) -> Item | None:
        mime_b64 = elem.findtext(t("MimeContent"))
        extra = [a for tag in ("ToRecipients", "CcRecipients", "BccRecipients")
                 for a in _addresses(elem.find(t(tag)))]
        box = self.org.mailbox(saved.mailbox) if saved is not None else (
            caller.impersonated or self.org.find_mailbox(caller.principal.mailbox if caller.principal else None))
        if box is None:
            raise EwsError("ErrorMissingEmailAddress",
                           "When making a request as an account that does not have a mailbox, you must specify "
                           "the mailbox primary SMTP address for any distinguished folder Ids.")
        if mime_b64:
            try:
                mime = base64.b64decode("".join(mime_b64.split()), validate=True)
            except binascii.Error:
                raise EwsError("ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        else:
            from_ = (_addresses(elem.find(t("From"))) or [Address(box.address, box.display_name)])[0]
            body = elem.find(t("Body"))
            attachments = [
                Attachment(name=a.findtext(t("Name")) or "attachment",
                           content_type=a.findtext(t("ContentType")) or "application/octet-stream",
                           content=base64.b64decode(a.findtext(t("Content")) or ""))
                for a in elem.iterfind(f"{t('Attachments')}/{t('FileAttachment')}")
            ]
            mime = build_mime(
                sender=from_, to=_addresses(elem.find(t("ToRecipients"))), cc=_addresses(elem.find(t("CcRecipients"))),
                bcc=_addresses(elem.find(t("BccRecipients"))), reply_to=_addresses(elem.find(t("ReplyTo"))),
                subject=elem.findtext(t("Subject")) or "", body=body.text or "" if body is not None else "",
                body_type=body.get("BodyType", "Text") if body is not None else "Text", headers=[],
                attachments=attachments, domain=self.org.domain, now=self.org.now())
            extra = []  # already in the MIME built from these properties
        probe = Item.from_mime(mime, "", now=self.org.now())
        sender_address = probe.from_.email if probe.from_ else box.address
        sender_box = self.org.find_mailbox(sender_address)
        if sender_box is None or not caller.can_send_as(sender_box) or (
                sender_box is not box and not caller.can_send_as(box)):
            raise EwsError("ErrorSendAsDenied", "The user account which was used to submit this request does not "
                                                "have the right to send mail on behalf of the specified sending account.")
        if disposition in ("SendOnly", "SendAndSaveCopy"):
            if not probe.to and not probe.cc and not probe.bcc and not extra:
                raise EwsError("ErrorInvalidRecipients", "At least one recipient isn't valid.")
            self.org.submit("ews", box, mime, save_copy=disposition == "SendAndSaveCopy",
                            extra_recipients=extra, saved_folder=saved)
            return None
        folder = saved or box.folder("drafts")
        draft = Item.from_mime(mime, folder.id, now=self.org.now())  # type: ignore[union-attr]
        draft.is_draft, draft.is_read = True, True
        draft.to.extend(a for a in extra if a not in draft.to)
        return self.org.add_item(folder, draft)  # type: ignore[arg-type]

    def _create_other(self, caller: Caller, elem: etree._Element, kind: str, saved: Folder | None) -> Item:
        default = {"CalendarItem": "calendar", "Contact": "contacts", "Task": "tasks"}.get(kind)
        if default is None:
            raise EwsError("ErrorInvalidOperation", f"The simulator does not store {kind} items.")
        box = caller.impersonated or self.org.find_mailbox(caller.principal.mailbox if caller.principal else None)
        folder = saved or (box.folder(default) if box else None)
        if folder is None:
            raise EwsError("ErrorMissingEmailAddress", "The request must name a mailbox.")
        item_class = {"CalendarItem": "IPM.Appointment", "Contact": "IPM.Contact", "Task": "IPM.Task"}[kind]
        # Later work (exchange_sync) gives these real shapes; until then every property is kept as its text.
        fields = {etree.QName(c).localname: (c.text or "").strip() for c in elem}
        item = Item(folder_id=folder.id, item_class=item_class, subject=str(fields.get("Subject", "")),
                    fields=fields, date_created=self.org.now(), is_read=True)
        return self.org.add_item(folder, item)

    def _find_item(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        shape = _Shape.parse(op.find(m("ItemShape")))
        view = op.find(m("IndexedPageItemView"))
        restriction = op.find(m("Restriction"))
        order = op.find(f"{m('SortOrder')}/{t('FieldOrder')}")
        parents = op.find(m("ParentFolderIds"))
        for ref in (parents if parents is not None else []):
            try:
                folder = self._resolve_folder(caller, ref)
            except EwsError as err:
                self._error(messages, "FindItem", err)
                continue
            items = list(folder.items.values())
            if restriction is not None and len(restriction):
                items = [i for i in items if _matches(restriction[0], i)]
            if order is not None:
                uri = order.find(t("FieldURI"))
                key = _FIELD_VALUES.get(uri.get("FieldURI", "") if uri is not None else "")
                if key is not None:
                    items.sort(key=lambda i: (key(i) is None, key(i) or ""),
                               reverse=order.get("Order") == "Descending")
            else:
                items.sort(key=lambda i: i.date_received or self.org.now(), reverse=True)  # Exchange's default
            total = len(items)
            offset, limit = 0, total
            if view is not None:
                offset = int(view.get("Offset", "0"))
                limit = int(view.get("MaxEntriesReturned", str(total)))
                if view.get("BasePoint") == "End":
                    offset = max(total - offset - limit, 0)
            page = items[offset:offset + limit]
            msg = self._message(messages, "FindItem")
            root = sub(msg, m("RootFolder"), IndexedPagingOffset=str(offset + len(page)),
                       TotalItemsInView=str(total), IncludesLastItemInRange=str(offset + len(page) >= total).lower())
            out = sub(root, t("Items"))
            for item in page:
                self._item_xml(out, item, shape, folder)

    def _get_item(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        shape = _Shape.parse(op.find(m("ItemShape")))
        ids = op.find(m("ItemIds"))
        for ref in (ids if ids is not None else []):
            try:
                _, folder, item = self._item_by_id(caller, ref.get("Id", ""))
            except EwsError as err:
                self._error(messages, "GetItem", err)
                continue
            msg = self._message(messages, "GetItem")
            self._item_xml(sub(msg, m("Items")), item, shape, folder)

    def _sync_folder_items(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        shape = _Shape.parse(op.find(m("ItemShape")))
        try:
            ref = op.find(f"{m('SyncFolderId')}/*")
            if ref is None:
                raise EwsError("ErrorInvalidRequest", "The request is invalid.")
            folder = self._resolve_folder(caller, ref)
            since = decode_sync_state(op.findtext(m("SyncState")), folder)
        except EwsError as err:
            self._error(messages, "SyncFolderItems", err)
            return
        limit = int(op.findtext(m("MaxChangesReturned")) or "512")
        ignored = {e.get("Id") for e in op.iterfind(f"{m('Ignore')}/{t('ItemId')}")}
        pending = [c for c in folder.changes if c.seq > since]
        emitted: list[tuple[str, str]] = []
        position = since
        msg = self._message(messages, "SyncFolderItems")
        state = sub(msg, m("SyncState"))
        last = sub(msg, m("IncludesLastItemInRange"))
        changes = sub(msg, m("Changes"))
        for change in pending:
            if len(emitted) >= limit:
                break
            position = change.seq
            if change.item_id in ignored:
                continue
            item = folder.items.get(change.item_id)
            if change.kind == "delete":
                sub(sub(changes, t("Delete")), t("ItemId"), Id=change.item_id)
            elif item is None:
                continue  # created or changed, then deleted: the later Delete tells the client
            elif change.kind == "read_flag":
                rf = sub(changes, t("ReadFlagChange"))
                sub(rf, t("ItemId"), Id=item.id, ChangeKey=item.change_key)
                sub(rf, t("IsRead"), item.is_read)
            else:
                self._item_xml(sub(changes, t("Create" if change.kind == "create" else "Update")), item, shape, folder)
            emitted.append((change.kind, change.item_id))
        if not pending or position == pending[-1].seq:
            position = max(position, self.org.last_seq)
        state.text = encode_sync_state(folder, position)
        last.text = str(not pending or position >= pending[-1].seq).lower()

    def _delete_item(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        delete_type = op.get("DeleteType", "HardDelete")
        ids = op.find(m("ItemIds"))
        for ref in (ids if ids is not None else []):
            try:
                box, folder, item = self._item_by_id(caller, ref.get("Id", ""))
            except EwsError as err:
                self._error(messages, "DeleteItem", err)
                continue
            if delete_type == "MoveToDeletedItems" and folder.distinguished_id != "deleteditems":
                self.org.move_item(item, folder, box.folder("deleteditems"))  # type: ignore[arg-type]
            else:
                self.org.delete_item(folder, item.id)
            self._message(messages, "DeleteItem")

    def _move_item(self, caller: Caller, op: etree._Element, messages: etree._Element) -> None:
        target_ref = op.find(f"{m('ToFolderId')}/*")
        ids = op.find(m("ItemIds"))
        for ref in (ids if ids is not None else []):
            try:
                if target_ref is None:
                    raise EwsError("ErrorInvalidRequest", "The request is invalid.")
                target = self._resolve_folder(caller, target_ref)
                box, folder, item = self._item_by_id(caller, ref.get("Id", ""))
                if target.mailbox.lower() != box.address.lower():
                    raise EwsError("ErrorCrossMailboxMoveCopy", "Cross-mailbox moves are not supported.")
            except EwsError as err:
                self._error(messages, "MoveItem", err)
                continue
            moved = self.org.move_item(item, folder, target)
            msg = self._message(messages, "MoveItem")
            sub(sub(sub(msg, m("Items")), t("Message")), t("ItemId"), Id=moved.id, ChangeKey=moved.change_key)

    # -- item rendering

    def _item_xml(self, parent: etree._Element, item: Item, shape: _Shape, folder: Folder) -> None:
        kind = item.item_class.split(".")[1] if item.item_class.count(".") else "Note"
        e = sub(parent, t(_ITEM_TAGS.get(kind, "Message")))
        wanted = shape.wants
        if (shape.include_mime or wanted("item:MimeContent")) and item.mime is not None:
            sub(e, t("MimeContent"), base64.b64encode(item.mime).decode(), CharacterSet="UTF-8")
        sub(e, t("ItemId"), Id=item.id, ChangeKey=item.change_key)
        if wanted("item:ParentFolderId"):
            sub(e, t("ParentFolderId"), Id=folder.id, ChangeKey=folder.change_key)
        if wanted("item:ItemClass"):
            sub(e, t("ItemClass"), item.item_class)
        if wanted("item:Subject"):
            sub(e, t("Subject"), item.subject)
        if wanted("item:Body"):
            body_type = shape.body_type if shape.body_type in ("HTML", "Text") else item.body_type
            sub(e, t("Body"), item.body, BodyType=body_type)
        if wanted("item:Attachments") and item.attachments:
            atts = sub(e, t("Attachments"))
            for a in item.attachments:
                fa = sub(atts, t("FileAttachment"))
                sub(fa, t("AttachmentId"), Id=a.id)
                sub(fa, t("Name"), a.name)
                sub(fa, t("ContentType"), a.content_type)
                sub(fa, t("Size"), len(a.content))
        if wanted("item:DateTimeReceived") and item.date_received:
            sub(e, t("DateTimeReceived"), ews_time(item.date_received))
        if wanted("item:Size"):
            sub(e, t("Size"), item.size)
        if wanted("item:InReplyTo") and item.in_reply_to:
            sub(e, t("InReplyTo"), item.in_reply_to)
        if wanted("item:IsDraft"):
            sub(e, t("IsDraft"), item.is_draft)
        if wanted("item:InternetMessageHeaders") and item.headers:
            hs = sub(e, t("InternetMessageHeaders"))
            for name, value in item.headers:
                sub(hs, t("InternetMessageHeader"), value, HeaderName=name)
        if wanted("item:DateTimeSent") and item.date_sent:
            sub(e, t("DateTimeSent"), ews_time(item.date_sent))
        if wanted("item:DateTimeCreated") and item.date_created:
            sub(e, t("DateTimeCreated"), ews_time(item.date_created))
        if wanted("item:HasAttachments"):
            sub(e, t("HasAttachments"), bool(item.attachments))
        if wanted("item:ConversationId") and item.conversation_id:
            sub(e, t("ConversationId"), Id=item.conversation_id)
        if kind != "Note":
            return
        internal = self.org.find_mailbox
        if wanted("message:Sender") and item.sender:
            _mailbox(sub(e, t("Sender")), t("Mailbox"), item.sender, internal=bool(internal(item.sender.email)))
        for uri, tag, addrs in (("message:ToRecipients", "ToRecipients", item.to),
                                ("message:CcRecipients", "CcRecipients", item.cc),
                                ("message:BccRecipients", "BccRecipients", item.bcc)):
            if wanted(uri) and addrs:
                group = sub(e, t(tag))
                for a in addrs:
                    _mailbox(group, t("Mailbox"), a, internal=bool(internal(a.email)))
        if wanted("message:From") and item.from_:
            _mailbox(sub(e, t("From")), t("Mailbox"), item.from_, internal=bool(internal(item.from_.email)))
        if wanted("message:InternetMessageId") and item.internet_message_id:
            sub(e, t("InternetMessageId"), item.internet_message_id)
        if wanted("message:IsRead"):
            sub(e, t("IsRead"), item.is_read)
        if wanted("message:References") and item.references:
            sub(e, t("References"), item.references)
        if wanted("message:ReplyTo") and item.reply_to:
            group = sub(e, t("ReplyTo"))
            for a in item.reply_to:
                _mailbox(group, t("Mailbox"), a, internal=bool(internal(a.email)))


_ITEM_TAGS = {"Note": "Message", "Appointment": "CalendarItem", "Contact": "Contact", "Task": "Task"}

# The properties a ``Default`` shape returns, as Exchange documents for messages.
_DEFAULT_FIELDS = {"item:ParentFolderId", "item:ItemClass", "item:Subject", "item:Body", "item:Attachments",
                   "item:DateTimeReceived", "item:Size", "item:DateTimeSent", "item:DateTimeCreated",
                   "item:HasAttachments", "message:Sender", "message:ToRecipients", "message:CcRecipients",
                   "message:From", "message:IsRead", "item:IsDraft"}


@dataclass
class _Shape:
    base: str
    extra: set[str]
    include_mime: bool
    body_type: str | None

    @classmethod
    def parse(cls, shape: etree._Element | None) -> _Shape:
        if shape is None:
            return cls("Default", set(), False, None)
        extra = {u.get("FieldURI", "") for u in shape.iterfind(f"{t('AdditionalProperties')}/{t('FieldURI')}")}
        return cls(shape.findtext(t("BaseShape")) or "Default", extra,
                   (shape.findtext(t("IncludeMimeContent")) or "false").lower() == "true",
                   shape.findtext(t("BodyType")))

    def wants(self, uri: str) -> bool:
        if uri in self.extra or self.base == "AllProperties" and uri != "item:MimeContent":
            return True
        return self.base == "Default" and uri in _DEFAULT_FIELDS


def _mailbox(parent: etree._Element, tag: str, a: Address, *, internal: bool) -> None:
    e = sub(parent, tag)
    sub(e, t("Name"), a.name or a.email)
    sub(e, t("EmailAddress"), a.email)
    sub(e, t("RoutingType"), "SMTP")
    sub(e, t("MailboxType"), "Mailbox" if internal else "OneOff")


def _addresses(group: etree._Element | None) -> list[Address]:
    if group is None:
        return []
    return [Address(email=mb.findtext(t("EmailAddress")) or "", name=mb.findtext(t("Name")) or "")
            for mb in group.iter(t("Mailbox")) if mb.findtext(t("EmailAddress"))]


# Restriction support: the properties a FindItem restriction or sort may name.
_FIELD_VALUES: dict[str, Callable[[Item], object]] = {
    "message:InternetMessageId": lambda i: i.internet_message_id,
    "item:Subject": lambda i: i.subject,
    "message:IsRead": lambda i: i.is_read,
    "item:ItemClass": lambda i: i.item_class,
    "item:DateTimeReceived": lambda i: i.date_received.strftime("%Y-%m-%dT%H:%M:%SZ") if i.date_received else None,
    "item:DateTimeSent": lambda i: i.date_sent.strftime("%Y-%m-%dT%H:%M:%SZ") if i.date_sent else None,
    "item:DateTimeCreated": lambda i: i.date_created.strftime("%Y-%m-%dT%H:%M:%SZ") if i.date_created else None,
    "message:From": lambda i: i.from_.email if i.from_ else None,
    "message:Sender": lambda i: i.sender.email if i.sender else None,
    "item:ConversationId": lambda i: i.conversation_id,
}


def _normalize(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    text = "" if value is None else str(value)
    # exchangelib sends datetimes with an explicit offset or Z; compare on the second, UTC.
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return text[:19]
    return text


def _matches(expr: etree._Element, item: Item) -> bool:
    name = etree.QName(expr).localname
    if name == "And":
        return all(_matches(c, item) for c in expr)
    if name == "Or":
        return any(_matches(c, item) for c in expr)
    if name == "Not":
        return not _matches(expr[0], item)
    uri_elem = expr.find(t("FieldURI"))
    getter = _FIELD_VALUES.get(uri_elem.get("FieldURI", "") if uri_elem is not None else "")
    value = getter(item) if getter else None
    if name == "Exists":
        return value not in (None, "")
    constant = expr.find(f".//{t('Constant')}")
    wanted = constant.get("Value", "") if constant is not None else ""
    if name == "Contains":
        mode = expr.get("ContainmentComparison", "Exact")
        have, want = (str(value or ""), wanted)
        if "Ignore" in mode:
            have, want = have.lower(), want.lower()
        return want in have if expr.get("ContainmentMode", "Substring") == "Substring" else have.startswith(want)
    have, want = _normalize(value), _normalize(wanted)
    if value is None:
        return name == "IsNotEqualTo"
    return {
        "IsEqualTo": have == want, "IsNotEqualTo": have != want,
        "IsGreaterThan": have > want, "IsGreaterThanOrEqualTo": have >= want,
        "IsLessThan": have < want, "IsLessThanOrEqualTo": have <= want,
    }.get(name, False)


def encode_sync_state(folder: Folder, seq: int) -> str:
    return base64.b64encode(f"sim1:{folder.id}:{seq}".encode()).decode()


def decode_sync_state(state: str | None, folder: Folder) -> int:
    if not state:
        return 0
    try:
        tag, folder_id, seq = base64.b64decode(state, validate=True).decode().split(":")
        if tag != "sim1" or folder_id != folder.id:
            raise ValueError(state)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise EwsError("ErrorInvalidSyncStateData", "Synchronization state data is corrupt or otherwise invalid.")
